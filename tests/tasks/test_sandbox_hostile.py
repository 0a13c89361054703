"""Hostile programs through the code task: each scores 0 (a wrong or hacking solution), stays within its
limits while it runs (watched from outside through /proc, counting only the processes of its own
sandbox, whatever else runs on the machine), leaves no process behind, leaves the test process, its
parent, a canary process and the sandbox itself working, and does not change the reward of a correct
neighbour scored in the same batch, at the same time.

Limits are tight (5 s wall, 2 CPU s, 256 MiB, 24 processes, 64 KiB output, 8 MiB /tmp) so that even a
containment failure could not hurt the shared machine much.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
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
from open_files import past_select_limit

from rlcore import Prompt
from rlcore.config import build_options
from rlcore.testing import make_batch
from rlcore_tasks.cgroups import detect
from rlcore_tasks.code import Code
from rlcore_tasks.sandbox import UID_BASE, UID_COUNT, BwrapSandbox, Limits, sandbox_cgroups

LIMITS = {"timeout_s": 5.0, "cpu_s": 2, "memory_mb": 256, "max_processes": 24, "max_output_kb": 64, "tmp_mb": 8,
          "max_workers": 2}
AS_ROOT = os.geteuid() == 0
CGROUPS = sandbox_cgroups("auto")
SLACK_S = 3.0
"""Seconds a killed run may take beyond its timeout (sandbox start-up, judging and teardown on a loaded machine)."""
OWN_PIDNS = os.readlink("/proc/self/ns/pid")
SECRET = "EXPECTED-7f3a9c"
"""An expected value that no sandbox may ever hold."""
NEIGHBOUR = ("```python\ndef g(x):\n    return x * x\n```", ["assert g(3) == 9", "assert g(-2) == 4"])
"""A correct response scored beside every hostile one: it must score 1."""


@attrs.define
class Proc:
    pid: int
    ppid: int
    uid: int
    rss_kb: int
    pss_kb: int
    """Proportional set size: pages shared between processes (after fork) counted once in a sum."""
    name: str
    pidns: str


def processes() -> list[Proc]:
    """Every process on the machine, from /proc."""
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
            pidns = os.readlink(status.parent / "ns" / "pid")
            rollup = (status.parent / "smaps_rollup").read_text() if pidns != OWN_PIDNS else ""
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        rss = fields.get("VmRSS", "0 kB").split()[0]
        pss = next((line.split()[1] for line in rollup.splitlines() if line.startswith("Pss:")), "0")
        found.append(Proc(pid=int(status.parent.name), ppid=int(fields["PPid"]), uid=int(fields["Uid"].split()[0]),
                          rss_kb=int(rss), pss_kb=int(pss), name=fields["Name"].strip(), pidns=pidns))
    return found


def sandboxed(procs: list[Proc], keep: set[int]) -> list[Proc]:
    """Processes of sandboxes this test started: descendants of this process (but `keep`) in a pid
    namespace other than ours. Judges (plain processes in ours) and other tests' sandboxes do not count."""
    children: dict[int, list[Proc]] = {}
    for p in procs:
        children.setdefault(p.ppid, []).append(p)
    found, todo = [], [os.getpid()]
    while todo:
        for child in children.get(todo.pop(), []):
            if child.pid not in keep:
                found.append(child)
                todo.append(child.pid)
    return [p for p in found if p.pidns != OWN_PIDNS]


def by_sandbox(procs: list[Proc]) -> dict[str, list[Proc]]:
    """Sandbox processes grouped by sandbox (pid namespace), bwrap's own init left out."""
    groups: dict[str, list[Proc]] = {}
    for p in procs:
        if p.name != "bwrap":
            groups.setdefault(p.pidns, []).append(p)
    return groups


class Watch:
    """Samples the sandboxes' processes every 20 ms while a hostile program runs: the most processes and
    memory one sandbox held."""

    def __init__(self, keep: set[int]) -> None:
        self.keep = keep
        self.max_processes = self.max_rss_kb = self.max_total_pss_kb = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)

    def sample(self) -> None:
        while not self.stop.is_set():
            for procs in by_sandbox(sandboxed(processes(), self.keep)).values():
                self.max_processes = max(self.max_processes, len(procs))
                self.max_rss_kb = max([self.max_rss_kb, *(p.rss_kb for p in procs)])
                self.max_total_pss_kb = max(self.max_total_pss_kb, sum(p.pss_kb for p in procs))
            time.sleep(0.02)


def held_file_blocks() -> dict[str, int]:
    """Disk blocks of every regular file this process holds open (what a sandbox given one of its fds
    could grow: fallocate with FALLOC_FL_KEEP_SIZE reserves blocks without growing the size)."""
    blocks = {}
    for fd in Path("/proc/self/fd").iterdir():
        try:
            st = os.stat(fd)
            if stat.S_ISREG(st.st_mode):
                blocks[os.readlink(fd)] = st.st_blocks
        except OSError:
            continue
    return blocks


def available_kb() -> int:
    return int(next(line for line in Path("/proc/meminfo").read_text().splitlines()
                    if line.startswith("MemAvailable")).split()[1])


@contextmanager
def hostile() -> Iterator[Watch]:
    """Watch a hostile run, then check that the machine is as it was: no sandbox process left (the
    kernel tears a killed sandbox down within moments), the canary, this process and its parent alive,
    no file the trainer holds open grown (the whole disk is shared with other work, so it is not weighed)."""
    before = {p.pid for p in sandboxed(processes(), set())}  # children other tests of the session left running
    canary = subprocess.Popen(["sleep", "120"])
    keep = before | {canary.pid}
    parent = os.getppid()
    files = held_file_blocks()
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
        grown = {f: b for f, b in held_file_blocks().items() if b > files.get(f, 0) + 2048}
        assert grown == {}, f"files of the trainer grew: {grown}"
    finally:
        canary.kill()
        canary.wait()


@pytest.fixture(scope="module")
def task() -> Iterator[Code]:
    t = Code(build_options(Code.Options, LIMITS, "task"))
    t.setup(ctx=None)
    yield t
    t.teardown()


def score(t: Code, code: str, tests: list[str], setup: str = "") -> tuple[float, dict[str, float]]:
    """Reward and info of one response (`code` in a ```python block) against assert `tests`, scored in
    one batch with NEIGHBOUR, which must score 1."""
    batch = make_batch(groups=2, n=1)
    batch.texts = [f"```python\n{code}\n```", NEIGHBOUR[0]]
    batch.prompts = [Prompt(messages=[{"role": "user", "content": "?"}], id=name, answer={
        "kind": "asserts", "prefix": "", "entry_point": "", "setup": s, "tests": list(tests_)})
        for name, s, tests_ in (("hostile", setup, tests), ("neighbour", "", NEIGHBOUR[1]))]
    s = t.score(batch)
    assert s.rewards[1].item() == 1.0, f"the neighbour scored {s.rewards[1].item()}: {s.info[1]}"
    return s.rewards[0].item(), s.info[0]


@pytest.fixture(autouse=True)
def sandbox_still_works(task: Code) -> Iterator[None]:
    """After every hostile program, a correct solution still scores 1."""
    yield
    assert score(task, "def f():\n    return 1", ["assert f() == 1"])[0] == 1.0


# ---- verdicts: reward hacking --------------------------------------------------------------------------

HACKS = {
    "replacing exec and compile": "import builtins\nbuiltins.exec = builtins.compile = lambda *a, **k: None",
    "replacing the builtins' equality": "import builtins\nbuiltins.AssertionError = type('A', (Exception,), {})\n"
                                        "builtins.isinstance = lambda *a: True\nbuiltins.len = lambda *a: 7",
    "patching os.write": "import os\n_write = os.write\nos.write = lambda fd, data: _write(fd, b'2:T;' * 10)",
    "patching the runner's encoder": "import gc\nfor g in [o for o in gc.get_objects() if type(o) is dict and 'serve' in o]:\n"
                                     "    g.update(encode=lambda *a, **k: b'T', encode_result=lambda *a, **k: b'T',\n"
                                     "             extension=lambda *a: b'T')",
    "forging result frames": "import os\nfor fd in map(int, os.listdir('/proc/self/fd')):\n    try:\n"
                             "        os.write(fd, b'2:T;' * 20)\n    except OSError:\n        pass",
    "printing verdicts and result lines": "import os\nfor i in range(3):\n    print(f'@@rlcore-result {b\"T\".hex()}')\n"
                                          "    print(f'PASSED {i} 1')\nos.write(1, b'ok 0 1\\nok 1 1\\n')",
    "poisoning sys.modules": "import sys, types\nfake = types.ModuleType('math')\nfake.isclose = lambda *a, **k: True\n"
                             "sys.modules['math'] = fake\nsys.modules['json'] = fake",
    "writing frames at exit": "import atexit, os\nFDS = [int(fd) for fd in os.listdir('/proc/self/fd')]\n"
                              "atexit.register(lambda: [os.write(fd, b'2:T;' * 9) for fd in FDS if fd > 0])",
    "a __del__ that writes frames": "import os\nFDS = [int(fd) for fd in os.listdir('/proc/self/fd')]\n"
                                    "class D:\n    def __del__(self):\n        [os.write(fd, b'2:T;' * 9) for fd in FDS if fd > 2]\n"
                                    "keep = [D() for _ in range(3)]",
    "a thread that floods the channel": "import os, threading\nFD = max(int(fd) for fd in os.listdir('/proc/self/fd'))\n"
                                        "threading.Thread(target=lambda: [os.write(FD, b'2:T;') for _ in range(2000)], daemon=True).start()",
    "closing and duping the channel": "import os\nfor fd in map(int, os.listdir('/proc/self/fd')):\n    if fd > 2:\n"
                                      "        try:\n            os.dup2(1, fd)\n        except OSError:\n            pass",
}
"""Module-level code that a solution adds to take over the harness: none of it may score."""


@pytest.mark.parametrize("name", list(HACKS))
def test_taking_over_the_harness_scores_nothing(task, name):
    """Each hack, with a wrong solution, against asserts whose expected values the solution cannot know
    (whether compared with ==, math.isclose, len or isinstance)."""
    tests = [f"assert f(1) == {SECRET!r}", "import math\nassert math.isclose(f(2), 17.25)",
             "assert len(f(3)) == 7 and isinstance(f(3), list)"]
    with hostile():
        reward, info = score(task, f"{HACKS[name]}\ndef f(x):\n    return 0", tests)
    assert reward == 0.0 and info["reward_error"] == 0.0


def test_results_that_would_keep_the_judge_busy(task):
    """A result that makes a test loop for ages, and a set of ints that all hash alike (quadratic to
    build): the judge is stopped at its deadline (and replaced), the response scores 0, in bounded time."""
    code = "def f(x):\n    return 10 ** 18\ndef g():\n    return {i * (2 ** 61 - 1) for i in range(3000)}"
    with hostile():
        start = time.monotonic()
        reward, _ = score(task, code, ["assert sum(range(f(1))) == 45", "assert g() == {1}"])
        assert time.monotonic() - start < 2 * LIMITS["timeout_s"] + SLACK_S
    assert reward == 0.0


def test_an_object_equal_to_everything_scores_nothing(task):
    liars = textwrap.dedent("""\
        class Always:
            def __eq__(self, other):
                return True
            __ne__ = lambda self, other: False
            __hash__ = lambda self: 0
            __bool__ = lambda self: True
            __len__ = lambda self: 7
            __str__ = __repr__ = lambda self: 'EXPECTED'
        class Int(int):
            __eq__ = lambda self, other: True
            __hash__ = lambda self: 0
        class Str(str):
            __eq__ = lambda self, other: True
        class List(list):
            __eq__ = lambda self, other: True
        class Float(float):
            __lt__ = __gt__ = __eq__ = lambda self, other: True
        def f(kind):
            return {'obj': Always(), 'int': Int(0), 'str': Str('x'), 'list': List(), 'float': Float(9.0),
                    'nested': [Always()], 'nan': float('nan')}[kind]
    """)
    tests = ["assert f('obj') == 5", "assert f('obj') != f('obj') or f('obj') == [1]", "assert f('int') == 5",
             "assert f('str') == 'abc'", "assert f('list') == [1, 2]", "assert abs(f('float') - 0.5) < 1e-9",
             "assert f('nested') == [5]", "assert f('nan') == 0.5", "import math\nassert math.isclose(f('nan'), 0.5)",
             "assert {f('int'): 1} == {5: 1}", "assert str(f('obj')) == 'EXPECTED'"]
    with hostile():
        reward, _ = score(task, liars, tests)
    assert reward == 0.0


def test_nothing_of_the_tests_can_be_found_in_the_sandbox(task):
    """A solution searching every object of its interpreter, its frames, its files, /proc (its own and
    the processes it can see) and the fds it holds finds no expected value: they never entered."""
    spy = textwrap.dedent(f"""\
        import gc, glob, os, sys
        def search():
            found = []
            for obj in gc.get_objects():
                try:
                    found.append(repr(obj)[:10000])
                except Exception:
                    pass
            frame = sys._getframe()
            while frame is not None:
                found.append(repr(frame.f_globals)[:100000] + repr(frame.f_locals)[:100000])
                frame = frame.f_back
            for path in glob.glob('/proc/*/cmdline') + glob.glob('/proc/*/environ') + glob.glob('/proc/*/fd/*') + \\
                    glob.glob('/tmp/**', recursive=True) + ['/proc/1/maps', '/proc/self/mem']:
                try:
                    with open(path, 'rb') as fh:
                        found.append(fh.read(1 << 20).decode('latin-1'))
                except OSError:
                    pass
            text = '\\n'.join(found)
            start = text.find('EXPECTED')
            return text[start:start + len({SECRET!r})] if start >= 0 else ''
        def f(x):
            return search()
        print(search())
    """)
    with hostile():
        reward, _ = score(task, spy, [f"assert f(1) == {SECRET!r}", f"assert {SECRET!r} in f(2)"])
    assert reward == 0.0


def test_rewriting_output_in_place_and_filling_the_disk(task):
    """fds 0-2 and the results channel are pipes: pwrite fails and fallocate (FALLOC_FL_KEEP_SIZE, which
    RLIMIT_FSIZE never sees) has nothing to reserve; in /tmp, fallocate stops at its size; memfd is refused."""
    code = textwrap.dedent("""\
        import ctypes, json, os
        libc = ctypes.CDLL(None, use_errno=True)
        def f(x):
            seen = {'fallocate': [], 'pwrite': []}
            for fd in map(int, os.listdir('/proc/self/fd')):
                seen['fallocate'].append(libc.fallocate(fd, 1, ctypes.c_long(0), ctypes.c_long(1 << 32)))
                try:
                    os.pwrite(fd, b'2:T;', 0)
                    seen['pwrite'].append(0)
                except OSError as e:
                    seen['pwrite'].append(e.errno)
            with open('/tmp/big', 'wb') as fh:
                seen['tmp'] = libc.fallocate(fh.fileno(), 1, ctypes.c_long(0), ctypes.c_long(1 << 32))
            try:
                os.memfd_create('x')
            except OSError as e:
                seen['memfd'] = e.errno
            return json.dumps(seen)
        print(f(0))
    """)
    with hostile():
        reward, _ = score(task, code, ["assert f(1) == 0"])
        result = task.sandbox.run(code)
    assert reward == 0.0
    seen = json.loads(result.stdout)
    assert set(seen["fallocate"]) == {-1} and set(seen["pwrite"]) <= {errno.ESPIPE, errno.EBADF}
    assert seen["tmp"] == -1 and seen["memfd"] == errno.EPERM


def test_shared_memory_and_message_queues_are_refused(task):
    """SysV shared memory outlives a detached process's address space (memory RLIMIT_AS never counted):
    shmget and msgget are refused, POSIX message queues have no budget, /dev is read-only."""
    code = textwrap.dedent("""\
        import ctypes, json, os
        libc = ctypes.CDLL(None, use_errno=True)
        def call(f, *args):
            ctypes.set_errno(0)
            return [f(*args), ctypes.get_errno()]
        out = [call(libc.shmget, 0, 1 << 30, 0o1600), call(libc.msgget, 0, 0o1600),
               call(libc.mq_open, b'/q', 0o100 | 2, 0o600, None)]
        for path in ('/dev/shm/x', '/dev/x'):
            try:
                open(path, 'w').close()
                out.append(0)
            except OSError as e:
                out.append(e.errno)
        print(json.dumps(out))
    """)
    with hostile():
        result = task.sandbox.run(code)
        reward, _ = score(task, f"{code}\ndef f():\n    return 0", ["assert f() == 1"])
    assert reward == 0.0
    shm, msg, mq, *files = json.loads(result.stdout)
    assert shm == [-1, errno.EPERM] and msg == [-1, errno.EPERM] and mq[0] == -1
    assert len(files) == 2 and all(e in (errno.EROFS, errno.EACCES, errno.EPERM) for e in files)


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


def test_memory_bomb_over_many_processes():
    """4 processes of 64 MiB address space each: with a cgroup per sandbox, they hold at most its
    memory_mb together; without, at most their product."""
    sandbox = BwrapSandbox(Limits(timeout_s=5, cpu_s=2, memory_mb=64, processes=4, output_kb=64, tmp_mb=8))
    bomb = ("import os, time\nfor _ in range(3):\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
            "chunks = []\ntry:\n    while True:\n        chunks.append(bytearray(10**6))\n        chunks[-1][::4096] = b'x' * 245\n"
            "        print(len(chunks), flush=True)\nexcept MemoryError:\n    time.sleep(1)")
    with hostile() as watch:
        result = sandbox.run(bomb)
    bound = 64 if CGROUPS is not None and "memory" in CGROUPS.controllers else 4 * 64
    # PSS also counts the interpreter's shared file pages, which the host charged to its own cgroup
    assert watch.max_total_pss_kb <= (bound + 8) * 1024, (watch.max_total_pss_kb, result.stderr[-500:])
    # the bomb really allocated: the watcher saw it, or (when the 20 ms samples missed a process the
    # cgroup's OOM killer ended first) their own progress lines say so
    allocated_mb = len(result.stdout.split())  # one line per MB, from all four processes
    assert watch.max_total_pss_kb > 20 * 1024 or allocated_mb >= 20, (watch.max_total_pss_kb, result.stdout)
    assert watch.max_processes <= 4


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


@pytest.fixture
def cgroups_made(monkeypatch) -> list:
    """The sandbox cgroups created while a test runs (none without cgroup support)."""
    made: list = []
    if CGROUPS is not None:
        create = CGROUPS.create
        monkeypatch.setattr(CGROUPS, "create", lambda *args: made.append(create(*args)) or made[-1])
    return made


def test_exhausting_inodes_in_tmp(task, cgroups_made):
    """Empty files cost no tmpfs size but kernel memory: with a cgroup, the sandbox's memory bound
    counts it; without, the timeout ends it. Either way the host gets its memory back."""
    code = ("import os\ndef f():\n    return 1\nn = 0\nwhile True:\n    try:\n        os.close(os.open(f'/tmp/{n}', os.O_CREAT))\n"
            "        n += 1\n    except OSError:\n        os.mkdir(f'/tmp/d{n}')\n        n += 1")
    free = available_kb()
    with hostile():
        reward, _ = score(task, code, ["assert f() == 1"])
    assert reward == 0.0 and available_kb() > free - (512 << 10)
    peaks = [c.peak("memory") for c in cgroups_made if "memory" in CGROUPS.controllers]
    assert all((peak is None and CGROUPS.version == 2) or peak <= LIMITS["memory_mb"] << 20 for peak in peaks)
    assert peaks == [] or max(p or 0 for p in peaks) > 16 << 20  # the inodes were charged to the sandbox


def test_huge_output_and_a_slow_drip(task):
    with hostile():
        reward, _ = score(task, "def f():\n    return 1\nwhile True:\n    print('x' * 100000)", ["assert f() == 1"])
        drip, _ = score(task, "import sys, time\ndef f():\n    while True:\n        sys.stdout.write('.')\n"
                              "        sys.stdout.flush()\n        time.sleep(0.01)", ["assert f() == 1"])
        out = task.sandbox.run("while True:\n    print('x' * 100000)")
        err = task.sandbox.run("import sys\nwhile True:\n    try:\n        sys.stderr.write('e' * 100000)\n"
                               "    except OSError:\n        pass")
    cap = LIMITS["max_output_kb"] * 1024
    assert reward == 0.0 and drip == 0.0
    assert len(out.stdout) == cap and "BrokenPipeError" in out.stderr
    assert len(err.stderr) == cap and err.stdout == ""


def test_endless_and_changing_generators(task):
    """Iterators are read in the sandbox (at most a million items; an endless one is no plain data), and
    the judge compares the items it got."""
    code = textwrap.dedent("""\
        import itertools
        state = [0]
        def f(kind):
            if kind == 'endless':
                return itertools.count()
            state[0] += 1
            return (state[0] + i for i in range(3))
    """)
    with hostile():
        reward, _ = score(task, code, ["assert list(f('endless'))[:3] == [0, 1, 2]", "assert list(f('x')) == [5, 6, 7]",
                                       "assert f('x') == [1, 2, 3]"])
    assert reward == 0.0


def test_exceptions_that_lie(task):
    code = textwrap.dedent("""\
        class Passed(AssertionError):
            def __str__(self):
                return 'PASSED'
        class Exit(SystemExit):
            pass
        def f(kind):
            raise {'a': Passed, 'b': Exit, 'c': KeyboardInterrupt}[kind]()
    """)
    tests = ["f('a')", "try:\n    f('b')\nexcept Exception:\n    pass", "try:\n    f('c')\nexcept BaseException:\n    pass\n"
             "assert False"]
    with hostile():
        reward, _ = score(task, code, tests)
    assert reward == 0.0


@pytest.mark.slow  # ~16 s each: the spinner runs to its 15 s timeout
@pytest.mark.parametrize("cgroup", ["auto", "off"])
def test_setsid_children_do_not_starve_their_neighbour(cgroup):
    """15 spinning children that each try setsid() (under autogroup scheduling, each new session was
    worth a whole neighbour): setsid is refused and, with a cgroup, the sandbox has one CPU and the same
    weight as every other (without one, all its processes share the one session bwrap made). The
    neighbour needs 1.5 CPU seconds within 15 s: it had 1/16 of a core beside the spinner (24 s), and
    has at least a few tenths of one now, however busy the machine."""
    spinner = textwrap.dedent("""\
        import os
        for _ in range(15):
            if os.fork() == 0:
                try:
                    os.setsid()
                except OSError:
                    pass
                while True:
                    pass
        def f():
            return 1
        while True:
            pass
    """)
    busy = ("```python\nimport time\ndef g(x):\n    end = time.process_time() + 1.5\n    while time.process_time() < end:\n"
            "        pass\n    return x * x\n```")
    batch = make_batch(groups=2, n=1)
    batch.texts = [f"```python\n{spinner}\n```", busy]
    batch.prompts = [Prompt(messages=[{"role": "user", "content": "?"}], id=i, answer={
        "kind": "asserts", "prefix": "", "entry_point": "", "setup": "", "tests": t})
        for i, t in (("spinner", ["assert f() == 1"]), ("busy", ["assert g(3) == 9"]))]
    task = Code(build_options(Code.Options, {**LIMITS, "timeout_s": 15.0, "cgroup": cgroup}, "task"))
    try:
        with hostile():
            rewards = task.score(batch).rewards.tolist()
    finally:
        task.teardown()
    assert rewards == [0.0, 1.0]


def test_many_open_files_in_the_trainer(task):
    """Waiting on sandboxes with file descriptors past select()'s 1024 (once a ValueError: the correct
    neighbour scored 0 with a reward error)."""
    with past_select_limit(), hostile():
        reward, info = score(task, "def f():\n    return 0", ["assert f() == 1"])
    assert reward == 0.0 and info["reward_error"] == 0.0


def test_a_forged_sandbox_failure_is_a_wrong_answer(task):
    """Printing bwrap's error format and exiting 1 is the program's own output: reward 0, no reward error."""
    code = "import sys\nsys.stderr.write('bwrap: Creating new namespace failed: Operation not permitted\\n')\nsys.exit(1)"
    with hostile():
        reward, info = score(task, code, ["assert f() == 1"])
    assert reward == 0.0 and info["reward_error"] == 0.0


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
    assert result.stdout.splitlines() == ["[(1, 'lo')]", f"refused {errno.ECONNREFUSED}", "no dns"], result


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
               Path("/dev") / marker, Path("/dev/shm") / marker, Path("/etc") / marker]
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
    this test process, the judges and the canary by pid, a second sandbox runs beside it and must finish."""
    beside: dict[str, object] = {}
    other = threading.Thread(target=lambda: beside.update(
        result=task.sandbox.run("import time\ntime.sleep(2.5)\nprint('alive')")))
    with hostile():
        pids = [p.pid for p in processes() if p.ppid == os.getpid()]  # the canary and the judges
        killer = (
            "import os, subprocess\ndef f():\n    sent = 0\n"
            f"    for pid in [os.getppid(), 1, -1, {os.getpid()}, {os.getppid()}, *{pids!r}]:\n"
            "        try:\n            os.kill(pid, 9)\n            sent += 1\n        except OSError:\n            pass\n"
            "    return sent\n"
            "print(f(), flush=True)\nsubprocess.run(['/bin/sh', '-c', 'kill -9 -1'])\n")
        other.start()
        time.sleep(0.5)
        reward, _ = score(task, killer, ["assert f() >= 3"])
        other.join()
    assert reward == 0.0
    assert beside["result"].exit_code == 0 and beside["result"].stdout == "alive\n"


def descendants(pid: int) -> list[Proc]:
    procs = processes()
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for p in procs:
            if p.ppid == parent:
                found.append(p)
                todo.append(p.pid)
    return found


@pytest.mark.slow  # the stand-in trainer imports rlcore (and torch) first
def test_killing_the_trainer_kills_its_sandboxes_and_its_cgroups_go(task):
    trainer = subprocess.Popen([sys.executable, "-c", (
        "from rlcore_tasks.sandbox import BwrapSandbox, Limits\n"
        "BwrapSandbox(Limits(timeout_s=60, cpu_s=2, memory_mb=256, processes=8)).run('import time; time.sleep(60)')")])
    with hostile():
        deadline = time.monotonic() + 30
        while len(started := descendants(trainer.pid)) < 3:  # bwrap, its init, the sandboxed python
            assert time.monotonic() < deadline and trainer.poll() is None, "the sandbox did not start"
            time.sleep(0.05)
        trainer.kill()
        trainer.wait()
        deadline = time.monotonic() + 3
        while (alive := [p.pid for p in started if Path(f"/proc/{p.pid}").exists()]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert alive == []
    if CGROUPS is not None:  # the dead trainer's cgroups are swept by the next trainer that looks for cgroups
        bases = {parent.parent for parent in CGROUPS.parents.values()}
        assert any((base / f"rlcore-{trainer.pid}").exists() for base in bases)
        detect()
        assert not any((base / f"rlcore-{trainer.pid}").exists() for base in bases)


def test_the_program_runs_unprivileged_alone_and_limited(task):
    probe = ("import json, os, resource\n"
             f"names = {list(Limits().rlimits())!r}\n"
             "status = dict(line.split(':', 1) for line in open('/proc/self/status').read().splitlines())\n"
             "print(json.dumps({'uid': os.getuid(), 'gid': os.getgid(), 'groups': os.getgroups(),\n"
             "    'limits': {n: list(resource.getrlimit(getattr(resource, n))) for n in names},\n"
             "    'caps': status['CapEff'].strip(), 'pids': sorted(int(p) for p in os.listdir('/proc') if p.isdigit()),\n"
             "    'host': os.uname().nodename, 'root': sorted(os.listdir('/')), 'cwd': os.getcwd(),\n"
             "    'fds': sorted(os.listdir('/proc/self/fd'))}))")
    seen = json.loads(task.sandbox.run(probe).stdout)
    limits = Limits(timeout_s=5, cpu_s=2, memory_mb=256, processes=24, output_kb=64, tmp_mb=8)
    assert seen["limits"] == {k: list(v) for k, v in limits.rlimits().items()}
    assert seen["caps"] == "0000000000000000" and seen["groups"] == [] and seen["pids"] == [1, 2]
    assert seen["host"] == "sandbox" and seen["cwd"] == "/tmp"
    assert seen["fds"] == ["0", "1", "2", "3"]  # 3: the listing's own; no job, seccomp, ready or results fd left
    assert set(seen["root"]) <= {"usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "proc", "dev", "tmp",
                                 *Path(task.sandbox.python).parts[1:2]}
    if AS_ROOT:
        assert UID_BASE <= seen["uid"] < UID_BASE + UID_COUNT and seen["gid"] == seen["uid"]
    else:
        assert seen["uid"] == os.getuid()
