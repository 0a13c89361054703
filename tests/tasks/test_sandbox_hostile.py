"""Hostile programs in the code task's sandbox: each scores 0, stays within its limits while it runs
(watched from outside through /proc), leaves no process behind, and leaves the test process, its
parent, a canary process and the sandbox itself working.

Limits are tight (5 s wall, 2 CPU s, 256 MiB, 24 processes, 64 KiB output, 8 MiB /tmp) so that even a
containment failure could not hurt the shared machine much; the tests run one at a time.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import attrs
import pytest

from rlcore import Prompt
from rlcore.config import build_options
from rlcore.testing import make_batch
from rlcore_tasks.code import Code
from rlcore_tasks.sandbox import UID_BASE, UID_COUNT, BwrapSandbox, Limits

LIMITS = {"timeout_s": 5.0, "cpu_s": 2, "memory_mb": 256, "max_processes": 24, "max_output_kb": 64, "tmp_mb": 8,
          "max_workers": 1}
AS_ROOT = os.geteuid() == 0
SLACK_S = 2.0
"""Seconds a killed run may take beyond its timeout (sandbox start-up and teardown on a loaded machine)."""


@attrs.define
class Proc:
    pid: int
    ppid: int
    uid: int
    rss_kb: int
    name: str


def processes() -> list[Proc]:
    """Every process on the machine, from /proc."""
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        rss = fields.get("VmRSS", "0 kB").split()[0]
        found.append(Proc(pid=int(status.parent.name), ppid=int(fields["PPid"]), uid=int(fields["Uid"].split()[0]),
                          rss_kb=int(rss), name=fields["Name"].strip()))
    return found


def sandboxed(procs: list[Proc], keep: set[int]) -> list[Proc]:
    """Processes of a sandbox: descendants of this test process (but `keep`), and, started as root,
    anything running under a sandbox uid wherever it was reparented."""
    children: dict[int, list[Proc]] = {}
    for p in procs:
        children.setdefault(p.ppid, []).append(p)
    found, todo = {}, [os.getpid()]
    while todo:
        for child in children.get(todo.pop(), []):
            if child.pid not in keep:
                found[child.pid] = child
                todo.append(child.pid)
    if AS_ROOT:
        found.update({p.pid: p for p in procs if UID_BASE <= p.uid < UID_BASE + UID_COUNT})
    return [p for p in found.values() if p.pid not in keep]


class Watch:
    """Samples the sandbox's processes every 20 ms while a hostile program runs."""

    def __init__(self, keep: set[int]) -> None:
        self.keep = keep
        self.max_processes = self.max_rss_kb = self.max_total_rss_kb = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)

    def sample(self) -> None:
        while not self.stop.is_set():
            procs = [p for p in sandboxed(processes(), self.keep) if p.name != "bwrap"]
            self.max_processes = max(self.max_processes, len(procs))
            self.max_rss_kb = max([self.max_rss_kb, *(p.rss_kb for p in procs)])
            self.max_total_rss_kb = max(self.max_total_rss_kb, sum(p.rss_kb for p in procs))
            time.sleep(0.02)


@contextmanager
def hostile() -> Iterator[Watch]:
    """Watch a hostile run, then check that the machine is as it was: no sandbox process left (the
    kernel tears a killed sandbox down within moments), the canary, this process and its parent alive."""
    before = {p.pid for p in sandboxed(processes(), set())}  # children other tests of the session left running
    canary = subprocess.Popen(["sleep", "120"])
    keep = before | {canary.pid}
    parent = os.getppid()
    watch = Watch(keep=keep)
    watch.thread.start()
    try:
        try:
            yield watch
        finally:
            watch.stop.set()
            watch.thread.join()
        deadline = time.monotonic() + 3.0
        while (left := sandboxed(processes(), keep)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert left == [], f"processes left behind: {left}"
        assert canary.poll() is None, "the canary process was killed"
        assert os.getppid() == parent
        os.kill(parent, 0)
    finally:
        canary.kill()
        canary.wait()


@pytest.fixture(scope="module")
def task() -> Iterator[Code]:
    t = Code(build_options(Code.Options, LIMITS, "task"))
    t.sandbox.check()
    yield t
    t.teardown()


def score(t: Code, code: str, tests: list[str]) -> tuple[float, dict[str, float]]:
    """Reward and info of one response (`code` in a ```python block) against assert `tests`."""
    answer = {"kind": "asserts", "prefix": "", "entry_point": "", "setup": "", "tests": tests}
    batch = make_batch(groups=1, n=1)
    batch.texts = [f"```python\n{code}\n```"]
    batch.prompts = [Prompt(messages=[{"role": "user", "content": "?"}], answer=answer, id="hostile")]
    s = t.score(batch)
    return s.rewards.item(), s.info[0]


@pytest.fixture(autouse=True)
def sandbox_still_works(task: Code) -> Iterator[None]:
    """After every hostile program, a correct solution still scores 1."""
    yield
    assert score(task, "def f():\n    return 1", ["assert f() == 1"])[0] == 1.0


# ---- resource exhaustion ----------------------------------------------------------------------------------

def test_infinite_loop(task):
    with hostile():
        start = time.monotonic()
        reward, _ = score(task, "def f():\n    return 1\nwhile True:\n    pass", ["assert f() == 1"])
        assert time.monotonic() - start < LIMITS["timeout_s"] + SLACK_S
    assert reward == 0.0


def test_sleeping_past_the_timeout(task):
    with hostile():
        start = time.monotonic()
        reward, info = score(task, "import time\ndef f():\n    time.sleep(100)\n    return 1", ["assert f() == 1"])
        assert LIMITS["timeout_s"] <= time.monotonic() - start < LIMITS["timeout_s"] + SLACK_S
    assert reward == 0.0 and info["timed_out"] == 1.0


def test_fork_bomb(task):
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    with hostile() as watch:
        reward, info = score(task, f"def f():\n    return 1\n{bomb}", ["assert f() == 1"])
    assert reward == 0.0 and info["timed_out"] == 1.0
    assert 2 <= watch.max_processes <= LIMITS["max_processes"]


def test_fork_bomb_in_a_shell(task):
    """The classic shell bomb runs into the process limit ("Cannot fork") and dies out; the program waits."""
    bomb = "import os, time\nos.system('b() { b | b & }; b')\ntime.sleep(100)\ndef f():\n    return 1"
    with hostile() as watch:
        reward, info = score(task, bomb, ["assert f() == 1"])
        result = task.sandbox.run("import os, time\nos.system('b() { b | b & }; b')\ntime.sleep(1)")
    assert reward == 0.0 and info["timed_out"] == 1.0
    assert "Cannot fork" in result.stderr and watch.max_processes <= LIMITS["max_processes"]


def test_memory_bomb(task):
    bomb = "chunks = []\nwhile True:\n    chunks.append(bytearray(10**7))"
    with hostile() as watch:
        reward, _ = score(task, f"def f():\n    return 1\n{bomb}", ["assert f() == 1"])
        result = task.sandbox.run(bomb)
        big = task.sandbox.run("x = bytearray(10**10)")
    assert reward == 0.0 and "MemoryError" in result.stderr and "MemoryError" in big.stderr
    assert watch.max_rss_kb <= LIMITS["memory_mb"] * 1024


def test_memory_bomb_over_many_processes_stays_within_their_product():
    """Memory is limited per process: 4 processes of 64 MiB hold at most 256 MiB together."""
    sandbox = BwrapSandbox(Limits(timeout_s=5, cpu_s=2, memory_mb=64, processes=4, output_kb=64, tmp_mb=8))
    bomb = ("import os, time\nfor _ in range(3):\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
            "chunks = []\ntry:\n    while True:\n        chunks.append(bytearray(10**6))\nexcept MemoryError:\n"
            "    time.sleep(1)")
    with hostile() as watch:
        result = sandbox.run(bomb)
    seen = (result.exit_code, watch.max_processes, watch.max_total_rss_kb)
    assert seen[:2] == (0, 4) and 4 * 30 * 1024 < seen[2] <= 4 * 64 * 1024, (seen, result.stderr[-500:])


def test_filling_tmp_and_huge_files(task):
    """Each file stops at the output cap (EFBIG) and /tmp at its size (ENOSPC)."""
    chunk = 60 * 1024
    fill = ("written = 0\ntry:\n    for i in range(1000):\n        with open(f'/tmp/f{i}', 'wb') as f:\n"
            f"            f.write(b'x' * {chunk})\n        written += 1\nexcept OSError as e:\n    print(written, e.errno)")
    grow = ("size = 0\ntry:\n    with open('/tmp/big', 'wb') as f:\n        while True:\n"
            "            f.write(b'x' * 4096)\n            f.flush()\n            size += 4096\nexcept OSError as e:\n"
            "    print(size, e.errno)")
    with hostile():
        filled = task.sandbox.run(fill).stdout.split()
        grown = task.sandbox.run(grow).stdout.split()
    assert int(filled[1]) == errno.ENOSPC and int(filled[0]) * chunk <= LIMITS["tmp_mb"] << 20
    assert int(filled[0]) * chunk > (LIMITS["tmp_mb"] << 20) // 2
    assert grown == [str(LIMITS["max_output_kb"] * 1024), str(errno.EFBIG)]


def test_huge_output(task):
    with hostile():
        reward, _ = score(task, "def f():\n    return 1\nwhile True:\n    print('x' * 100000)", ["assert f() == 1"])
        out = task.sandbox.run("while True:\n    print('x' * 100000)")
        err = task.sandbox.run("import sys\nwhile True:\n    try:\n        sys.stderr.write('e' * 100000)\n"
                               "    except OSError:\n        pass")
    cap = LIMITS["max_output_kb"] * 1024
    assert reward == 0.0
    assert len(out.stdout) == cap and "File too large" in out.stderr
    assert len(err.stderr) <= cap and err.stdout == ""


# ---- escapes --------------------------------------------------------------------------------------------

def test_network_access(task):
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.5)
    port = server.getsockname()[1]
    code = f"import socket\ndef f():\n    return socket.create_connection(('127.0.0.1', {port}), timeout=2).recv(100)"
    probe = textwrap.dedent(f"""\
        import socket
        print(socket.if_nameindex())
        try:
            socket.create_connection(('127.0.0.1', {port}), timeout=2)
        except OSError as e:
            print('refused', e.errno)
        try:
            socket.getaddrinfo('pypi.org', 443)
        except OSError:
            print('no dns')
    """)
    with hostile():
        reward, _ = score(task, code, ["assert f() == b'secret'"])
        result = task.sandbox.run(probe)
    with pytest.raises(TimeoutError):
        server.accept()
    server.close()
    assert reward == 0.0
    assert result.stdout.splitlines() == ["[(1, 'lo')]", f"refused {errno.ECONNREFUSED}", "no dns"]


def test_secrets_environment_and_home_are_invisible(task, tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_rsa").write_text("SECRET-KEY-FILE")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("RLCORE_TEST_SECRET", "SECRET-ENV-VALUE")
    assert os.path.expanduser("~/.ssh/id_rsa") == str(home / ".ssh" / "id_rsa")
    spy = textwrap.dedent(f"""\
        import glob, os
        def f():
            found = [repr(dict(os.environ))]
            paths = [os.path.expanduser('~/.ssh/id_rsa'), {str(home / '.ssh' / 'id_rsa')!r}, '/root/.bash_history',
                     '/proc/1/environ', '/proc/{os.getpid()}/environ', '/proc/{os.getppid()}/environ']
            paths += glob.glob('/work/**', recursive=True)[:50] + glob.glob('/home/*/.ssh/*')
            paths += glob.glob('/proc/*/environ')
            for path in paths:
                try:
                    with open(path, errors='replace') as fh:
                        found.append(fh.read())
                except OSError as e:
                    found.append(f'{{path}}: {{e}}')
            return '\\n'.join(found)
        print(f())
    """)
    with hostile():
        reward, _ = score(task, spy, ["assert 'SECRET-' in f()"])
        result = task.sandbox.run(spy)
    assert reward == 0.0
    assert result.exit_code == 0 and "SECRET-" not in result.stdout + result.stderr
    assert "HOME': '/tmp'" in result.stdout and str(home) not in result.stdout.split("\n")[0]


def test_writing_outside_its_tmp(task, tmp_path):
    marker = f"rlcore-escaped-{os.getpid()}-{time.monotonic_ns()}"
    prefix = Path(task.sandbox.python).parent.parent
    targets = [tmp_path / marker, Path("/usr") / marker, Path("/") / marker, prefix / marker, Path("/proc") / marker,
               Path("/dev") / marker, Path("/etc") / marker]
    writer = ("import os\ndef f():\n    done = 0\n"
              f"    for path in {[str(t) for t in targets]!r}:\n        try:\n"
              "            with open(path, 'w') as fh:\n                fh.write('x')\n            done += 1\n"
              "        except OSError:\n            pass\n"
              f"    with open('/tmp/{marker}', 'w') as fh:\n        fh.write('private')\n    return done\n")
    with hostile():
        reward, _ = score(task, writer, [f"assert f() == {len(targets)}", "assert f() > 0"])
    assert reward == 0.0
    assert [t for t in targets if t.exists()] == []
    assert not (Path("/tmp") / marker).exists()  # its /tmp was a private tmpfs


def test_new_namespaces_and_mounts_are_refused(task):
    code = ("import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            "def f():\n    return libc.unshare(0x10000000 | 0x00020000), libc.mount(b'none', b'/tmp', b'tmpfs', 0, None)\n"
            "print(f(), os.strerror(ctypes.get_errno()))")
    with hostile():
        reward, _ = score(task, code, ["assert f()[0] == 0"])
        result = task.sandbox.run(code)
    assert reward == 0.0 and result.stdout.strip() == "(-1, -1) Operation not permitted"


def test_signalling_its_parent_and_everyone(task):
    """While the hostile program signals its parent, pid 1, every process (-1, also through a shell),
    this test process and the canary by pid, a second sandbox runs beside it and must finish."""
    beside: dict[str, object] = {}
    other = threading.Thread(target=lambda: beside.update(
        result=task.sandbox.run("import time\ntime.sleep(2.5)\nprint('alive')")))
    with hostile():
        canary_pids = [p.pid for p in processes() if p.name == "sleep" and p.ppid == os.getpid()]
        killer = (
            "import os, subprocess\ndef f():\n    sent = 0\n"
            f"    for pid in [os.getppid(), 1, -1, {os.getpid()}, {os.getppid()}, *{canary_pids!r}]:\n"
            "        try:\n            os.kill(pid, 9)\n            sent += 1\n        except OSError:\n            pass\n"
            "    return sent\n"
            "print(f(), flush=True)\nsubprocess.run(['/bin/sh', '-c', 'kill -9 -1'])\n")
        other.start()
        time.sleep(0.5)
        reward, _ = score(task, killer, ["assert f() >= 3"])
        other.join()
    assert reward == 0.0
    assert beside["result"].exit_code == 0 and beside["result"].stdout == "alive\n"


@pytest.mark.slow  # the stand-in trainer imports rlcore (and torch) first
@pytest.mark.skipif(not AS_ROOT, reason="finds orphaned sandbox processes by their uid, which needs root mode")
def test_killing_the_trainer_kills_its_sandboxes(task):
    trainer = subprocess.Popen([sys.executable, "-c", (
        "from rlcore_tasks.sandbox import BwrapSandbox, Limits\n"
        "BwrapSandbox(Limits(timeout_s=60, cpu_s=2, memory_mb=256, processes=8)).run('import time; time.sleep(60)')")])
    with hostile():
        deadline = time.monotonic() + 30
        while not any(UID_BASE <= p.uid < UID_BASE + UID_COUNT for p in processes()):
            assert time.monotonic() < deadline and trainer.poll() is None, "the sandbox did not start"
            time.sleep(0.05)
        trainer.kill()
        trainer.wait()


def test_the_program_runs_unprivileged_alone_and_limited(task):
    probe = ("import json, os, resource\n"
             f"names = {list(Limits().rlimits())!r}\n"
             "status = dict(line.split(':', 1) for line in open('/proc/self/status').read().splitlines())\n"
             "print(json.dumps({'uid': os.getuid(), 'gid': os.getgid(), 'groups': os.getgroups(),\n"
             "    'limits': {n: list(resource.getrlimit(getattr(resource, n))) for n in names},\n"
             "    'caps': status['CapEff'].strip(), 'pids': sorted(int(p) for p in os.listdir('/proc') if p.isdigit()),\n"
             "    'host': os.uname().nodename, 'root': sorted(os.listdir('/')), 'cwd': os.getcwd()}))")
    seen = json.loads(task.sandbox.run(probe).stdout)
    limits = Limits(timeout_s=5, cpu_s=2, memory_mb=256, processes=24, output_kb=64, tmp_mb=8)
    assert seen["limits"] == {k: list(v) for k, v in limits.rlimits().items()}
    assert seen["caps"] == "0000000000000000" and seen["groups"] == [] and seen["pids"] == [1, 2]
    assert seen["host"] == "sandbox" and seen["cwd"] == "/tmp"
    assert set(seen["root"]) <= {"usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "proc", "dev", "tmp",
                                 *Path(task.sandbox.python).parts[1:2]}
    if AS_ROOT:
        assert UID_BASE <= seen["uid"] < UID_BASE + UID_COUNT and seen["gid"] == seen["uid"]
    else:
        assert seen["uid"] == os.getuid()
