"""A cgroup per sandbox, where this process may create one: the sandbox's memory (its processes', and
the page cache, shared memory and tmpfs files it creates), its process count and its CPU are then
bounded as a whole, and every sandbox gets the same CPU weight whatever its processes do (a process that
calls setsid() no longer gets a scheduling group of its own: autogroups only exist in the root group).

Found once per process (`detect`): cgroup v2 with the memory, pids and cpu controllers delegated to the
trainer's own cgroup or its parent, else the cgroup v1 hierarchies of those controllers, each where
this process may create a directory (root, usually). Sandbox cgroups live under `rlcore-<pid>` there,
created for each run and removed after it (what a trainer killed mid-run leaves, the next one sweeps). Where none can be created, `Cgroups.note` says why and
which weaker bounds hold instead.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import signal
import threading
import time
from pathlib import Path

log = logging.getLogger("rlcore.code.cgroups")

CONTROLLERS = ("memory", "pids", "cpu")
CPU_PERIOD_US = 100_000
REMOVE_WAIT_S = 2.0
"""How long removing a sandbox's cgroup waits for its processes to be gone."""
WITHOUT = ("without a cgroup per sandbox, memory is bounded per process (address space, so up to max_processes x "
           "memory_mb for a sandbox, plus its /tmp and pipe buffers), CPU per process (cpu_s) and by the wall-clock "
           "timeout, processes per sandbox by RLIMIT_NPROC, and CPU is shared fairly only through the sandbox's one "
           "session (setsid is refused inside); kernel memory a sandbox makes the kernel allocate (inodes, sockets) "
           "is not bounded")


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _mounts() -> list[tuple[str, str, str, set[str]]]:
    """(fstype, mount point, root inside the hierarchy, super options) of every cgroup mount."""
    found = []
    for line in _read(Path("/proc/self/mountinfo")).splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) >= 5 and len(tail) >= 3 and tail[0] in ("cgroup", "cgroup2"):
            found.append((tail[0], fields[4], fields[3], set(tail[2].split(","))))
    return found


def _own_paths() -> dict[str, str]:
    """This process's cgroup path per v1 controller, and under "" its v2 path (/proc/self/cgroup)."""
    paths = {}
    for line in _read(Path("/proc/self/cgroup")).splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(",") if controllers else [""]:
            paths[c] = path
    return paths


def _inside(mount: str, root: str, path: str) -> Path | None:
    """The directory of cgroup `path` under a mount of its hierarchy whose root is `root`."""
    if root == "/" or path == root or path.startswith(root.rstrip("/") + "/"):
        return Path(mount) / os.path.relpath(path, root if root != "/" else "/")
    return None


class SandboxCgroup:
    """The cgroup (one directory per hierarchy) of one sandbox run."""

    def __init__(self, dirs: list[Path]) -> None:
        self.dirs = dirs
        self.peaks: dict[str, int | None] = {}
        """The high-water marks when it was removed (see `peak`)."""
        self.oom_killed = False
        """Whether the kernel killed a process in it for memory (known after `remove`)."""

    @property
    def procs(self) -> list[str]:
        """The `cgroup.procs` files a process writes its pid to, to join."""
        return [str(d / "cgroup.procs") for d in self.dirs]

    def pids(self) -> set[int]:
        """Processes in the cgroup now."""
        return {int(p) for d in self.dirs for p in _read(d / "cgroup.procs").split()}

    def peak(self, name: str) -> int | None:
        """A counter's high-water mark (`memory` bytes, `pids`), where the kernel keeps one (after
        `remove`, its last value)."""
        if name in self.peaks:
            return self.peaks[name]
        files = {"memory": ("memory.peak", "memory.max_usage_in_bytes"), "pids": ("pids.peak",)}[name]
        for d in self.dirs:
            for f in files:
                if (d / f).exists():
                    return int(_read(d / f) or 0)
        return None

    def oom_kills(self) -> int:
        """Processes the kernel killed in it for memory: `oom_kill` of v2's memory.events or v1's
        memory.oom_control (0 where neither counts them)."""
        for d in self.dirs:
            for f in ("memory.events", "memory.oom_control"):
                for line in _read(d / f).splitlines():
                    key, _, value = line.partition(" ")
                    if key == "oom_kill" and value.strip().isdigit():
                        return int(value)
        return 0

    def remove(self) -> None:
        """Kill what is left in it and remove it (a leftover directory is logged, never raised)."""
        kill = next((d / "cgroup.kill" for d in self.dirs if (d / "cgroup.kill").exists()), None)
        deadline = time.monotonic() + REMOVE_WAIT_S
        while pids := self.pids():
            if kill is not None:
                _write(kill, "1")
            else:
                for pid in pids:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            if time.monotonic() > deadline:
                break
            time.sleep(0.005)
        self.peaks = {name: self.peak(name) for name in ("memory", "pids")}
        self.oom_killed = self.oom_kills() > 0
        for d in self.dirs:
            try:
                d.rmdir()
            except OSError as e:
                log.warning("could not remove the sandbox cgroup %s: %s", d, e)


class Cgroups:
    """Where this process creates sandbox cgroups, and what they bound (`note`)."""

    def __init__(self, version: int, parents: dict[str, Path], note: str) -> None:
        self.version = version
        self.parents = parents
        """The per-trainer directory for each controller (several controllers may share one)."""
        self.note = note
        self.counter = itertools.count()
        self.lock = threading.Lock()

    @property
    def controllers(self) -> tuple[str, ...]:
        return tuple(c for c in CONTROLLERS if c in self.parents)

    def create(self, memory_bytes: int, processes: int, cpus: float) -> SandboxCgroup:
        """A new sandbox cgroup with these bounds (OSError when the kernel refuses)."""
        with self.lock:
            name = str(next(self.counter))
        dirs = []
        try:
            for parent in dict.fromkeys(self.parents.values()):
                (parent / name).mkdir()
                dirs.append(parent / name)
            for controller, parent in self.parents.items():
                self._limit(parent / name, controller, memory_bytes, processes, cpus)
        except OSError:
            SandboxCgroup(dirs).remove()
            raise
        return SandboxCgroup(dirs)

    def _limit(self, d: Path, controller: str, memory_bytes: int, processes: int, cpus: float) -> None:
        quota = max(1000, int(cpus * CPU_PERIOD_US))
        if controller == "pids":
            _write(d / "pids.max", str(processes))
        elif controller == "memory" and self.version == 2:
            _write(d / "memory.max", str(memory_bytes))
            for f, v in (("memory.swap.max", "0"), ("memory.oom.group", "1")):
                if (d / f).exists():
                    _write(d / f, v)
        elif controller == "memory":
            _write(d / "memory.limit_in_bytes", str(memory_bytes))
            if (d / "memory.memsw.limit_in_bytes").exists():
                _write(d / "memory.memsw.limit_in_bytes", str(memory_bytes))
        elif self.version == 2:
            _write(d / "cpu.max", f"{quota} {CPU_PERIOD_US}")
        else:
            _write(d / "cpu.cfs_period_us", str(CPU_PERIOD_US))
            _write(d / "cpu.cfs_quota_us", str(quota))


def _sweep(base: Path) -> None:
    """Remove what trainers that were killed mid-run left under `base`: `rlcore-<pid>` directories of
    processes gone, with their sandbox cgroups (empty by then: the kernel killed the sandboxes with them)."""
    for stale in base.glob("rlcore-*"):
        pid = stale.name.removeprefix("rlcore-")
        if not pid.isdigit() or Path(f"/proc/{pid}").exists():
            continue
        try:
            for child in [c for c in stale.iterdir() if c.is_dir()]:
                child.rmdir()
            stale.rmdir()
        except OSError:
            pass


def _make_parent(base: Path, controllers: list[str], version: int) -> Path:
    """`base/rlcore-<pid>`, created (with `controllers` enabled for its children on v2), removed at exit;
    stale ones of dead trainers are swept first."""
    _sweep(base)
    parent = base / f"rlcore-{os.getpid()}"
    if not parent.is_dir():
        parent.mkdir()
        atexit.register(_remove_parent, parent)
    if version == 2:
        _write(parent / "cgroup.subtree_control", " ".join(f"+{c}" for c in controllers))
    return parent


def _remove_parent(parent: Path) -> None:
    try:
        parent.rmdir()
    except OSError:
        pass


def _v2(base: Path) -> Cgroups | None:
    """Sandbox cgroups under `base` (a cgroup v2 directory), where its controllers can be delegated."""
    available = [c for c in CONTROLLERS if c in _read(base / "cgroup.controllers").split()]
    if not available or not os.access(base, os.W_OK):
        return None
    enabled = _read(base / "cgroup.subtree_control").split()
    missing = [c for c in available if c not in enabled]
    try:
        if missing:  # refused (EBUSY) while `base` holds processes, as the trainer's own cgroup does
            _write(base / "cgroup.subtree_control", " ".join(f"+{c}" for c in missing))
        parent = _make_parent(base, available, 2)
    except OSError:
        return None
    return Cgroups(2, {c: parent for c in available}, f"cgroup v2 at {parent} ({', '.join(available)})")


def detect(setting: str = "auto") -> Cgroups | str:
    """The sandbox cgroups this process can create, or a line saying why there are none. `setting`:
    `auto` (look for them), `off`, or the path of a cgroup v2 directory to create them under."""
    if setting == "off":
        return "sandbox cgroups are off (task.cgroup=off)"
    if setting != "auto":
        found = _v2(Path(setting))
        return found or f"task.cgroup={setting!r} is not a writable cgroup v2 directory with memory, pids or cpu"
    mounts, own = _mounts(), _own_paths()
    for fstype, mount, root, _ in mounts:
        if fstype == "cgroup2" and "" in own and (base := _inside(mount, root, own[""])) is not None:
            for candidate in (base, base.parent):
                if (found := _v2(candidate)) is not None:
                    return found
    parents = {}
    for fstype, mount, root, options in mounts:
        for c in CONTROLLERS:
            if fstype == "cgroup" and c in options and c in own and c not in parents:
                base = _inside(mount, root, own[c])
                try:
                    if base is not None:
                        parents[c] = _make_parent(base, [c], 1)
                except OSError:
                    pass
    if parents:
        return Cgroups(1, parents, f"cgroup v1 ({', '.join(c for c in CONTROLLERS if c in parents)})")
    if os.geteuid() != 0:
        return "no cgroup: this process may not create one (not root, and none delegated to it)"
    return "no cgroup: no writable cgroup v2 with memory/pids/cpu delegated, nor cgroup v1 hierarchies of them"
