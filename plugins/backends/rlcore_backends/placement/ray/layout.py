"""Which Ray workers a run needs, how many devices each holds, and which plugins each hosts.

colocated: `rollout_parallel` workers of `rollout_devices` devices each; every one hosts a rollout replica
and worker 0 also hosts the backend, which trains on the devices of the first
`train_parallel / rollout_devices` workers (packed on one node), so rollout and training share devices
and worker 0's weight sync stays in process.
disaggregated: one training worker of `train_parallel` devices hosts the backend (a distributed backend
starts its own processes on them) and `rollout_parallel` separate workers host the rollout replicas.
"""

from __future__ import annotations

from typing import Literal

import attrs

Mode = Literal["colocated", "disaggregated"]


@attrs.define(frozen=True)
class WorkerSpec:
    """One Ray actor to start."""

    name: str
    """Shown in logs and errors, e.g. `rollout-1`."""
    devices: int
    """Devices (CPU cores, GPUs, NPUs: the hardware plugin's resource) the actor reserves."""
    kinds: tuple[str, ...]
    """Plugin kinds it hosts."""
    replica: int
    """Its rollout replica index (0 for a training-only worker): seeds its generators with seed + replica."""
    train_group: tuple[str, ...] = ()
    """Colocated backend worker only: the workers (itself first) whose devices its backend trains on, when
    more than its own; they are packed on one node and the backend's process sees all their devices."""


def colocated_train_workers(rollout_devices: int, train_parallel: int) -> int:
    """How many colocated workers' devices the backend trains on."""
    return max(1, train_parallel // rollout_devices)


def worker_specs(mode: Mode, kinds: set[str], rollout_parallel: int, rollout_devices: int,
                 train_parallel: int) -> list[WorkerSpec]:
    """The workers hosting the placed `kinds` (backend and/or rollout), the backend's worker first."""
    if mode == "colocated":
        count = rollout_parallel if "rollout" in kinds else colocated_train_workers(rollout_devices, train_parallel)
        names = [f"worker-{i}" for i in range(count)]
        group = tuple(names[:colocated_train_workers(rollout_devices, train_parallel)]) if "backend" in kinds else ()
        return [WorkerSpec(name, rollout_devices, _hosted(kinds, backend=i == 0), i,
                           group if i == 0 and len(group) > 1 else ())
                for i, name in enumerate(names)]
    train = [WorkerSpec("train-0", train_parallel, ("backend",), 0)] if "backend" in kinds else []
    rollout = [WorkerSpec(f"rollout-{i}", rollout_devices, ("rollout",), i)
               for i in range(rollout_parallel)] if "rollout" in kinds else []
    return train + rollout


def _hosted(kinds: set[str], backend: bool) -> tuple[str, ...]:
    """The placed kinds a colocated worker hosts: the rollout always, the backend only on worker 0."""
    return tuple(k for k in ("backend", "rollout") if k in kinds and (k == "rollout" or backend))


def scheduling_units(specs: list[WorkerSpec]) -> list[tuple[str, int]]:
    """(name, devices) of what must sit on one node: each worker, a colocated training group as one."""
    grouped = {name for s in specs for name in s.train_group[1:]}
    return [("+".join(s.train_group) or s.name, s.devices * max(1, len(s.train_group)))
            for s in specs if s.name not in grouped]


def fit_problem(mode: Mode, nodes: int, devices_per_node: int, rollout_parallel: int, rollout_devices: int,
                train_parallel: int) -> str | None:
    """Why these sizes do not fit the cluster (one sentence naming the options), or None when they do.

    Workers are packed into `nodes` bins of `devices_per_node` (first fit, largest first); a worker, and a
    colocated backend's group of workers, never spans nodes."""
    if mode == "colocated" and train_parallel > rollout_devices:
        if train_parallel % rollout_devices:
            return (f"train_parallel={train_parallel} is not a multiple of rollout_devices={rollout_devices}: in "
                    "colocated mode the backend trains on whole workers' devices")
        if train_parallel > rollout_parallel * rollout_devices:
            return (f"train_parallel={train_parallel} > rollout_parallel x rollout_devices = "
                    f"{rollout_parallel * rollout_devices}: in colocated mode the backend trains on the rollout "
                    "workers' devices; raise rollout_parallel or use mode=disaggregated")
    units = scheduling_units(worker_specs(mode, {"backend", "rollout"}, rollout_parallel, rollout_devices,
                                          train_parallel))
    name, biggest = max(units, key=lambda u: u[1])
    if biggest > devices_per_node:
        return (f"{name} needs {biggest} devices on one node but devices_per_node={devices_per_node}; lower "
                "train_parallel or rollout_devices")
    free = [devices_per_node] * nodes
    for _, size in sorted(units, key=lambda u: -u[1]):
        node = next((i for i, f in enumerate(free) if f >= size), None)
        if node is None:
            need = sum(size for _, size in units)
            return (f"{mode} mode needs {need} devices ({', '.join(f'{n}: {s}' for n, s in units)}) but nodes={nodes} "
                    f"x devices_per_node={devices_per_node} does not hold them (packed per node); lower "
                    "rollout_parallel, rollout_devices or train_parallel, or add nodes")
        free[node] -= size
    return None
