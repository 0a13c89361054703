"""Which Ray workers a run needs, how many devices each holds, and which plugins each hosts.

colocated: `rollout_parallel` workers of `rollout_devices` devices each; every one hosts a rollout
replica and worker 0 also hosts the backend (on its own devices), so its weight sync stays in process.
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


def worker_specs(mode: Mode, kinds: set[str], rollout_parallel: int, rollout_devices: int,
                 train_parallel: int) -> list[WorkerSpec]:
    """The workers hosting the placed `kinds` (backend and/or rollout), training worker first."""
    if mode == "colocated":
        count = rollout_parallel if "rollout" in kinds else 1
        return [WorkerSpec(f"worker-{i}", rollout_devices, _hosted(kinds, backend=i == 0), i) for i in range(count)]
    train = [WorkerSpec("train-0", train_parallel, ("backend",), 0)] if "backend" in kinds else []
    rollout = [WorkerSpec(f"rollout-{i}", rollout_devices, ("rollout",), i)
               for i in range(rollout_parallel)] if "rollout" in kinds else []
    return train + rollout


def _hosted(kinds: set[str], backend: bool) -> tuple[str, ...]:
    """The placed kinds a colocated worker hosts: the rollout always, the backend only on worker 0."""
    return tuple(k for k in ("backend", "rollout") if k in kinds and (k == "rollout" or backend))


def fit_problem(mode: Mode, nodes: int, devices_per_node: int, rollout_parallel: int, rollout_devices: int,
                train_parallel: int) -> str | None:
    """Why these sizes do not fit the cluster (one sentence naming the options), or None when they do.

    Each worker lives on one node, so workers are packed into `nodes` bins of `devices_per_node` (first fit,
    largest first)."""
    total = nodes * devices_per_node
    if mode == "colocated" and train_parallel > rollout_devices:
        return (f"train_parallel={train_parallel} > rollout_devices={rollout_devices}: in colocated mode the backend "
                "trains on worker 0's devices; raise rollout_devices or use mode=disaggregated")
    specs = worker_specs(mode, {"backend", "rollout"}, rollout_parallel, rollout_devices, train_parallel)
    need = sum(s.devices for s in specs)
    biggest = max(specs, key=lambda s: s.devices)
    if biggest.devices > devices_per_node:
        return (f"worker {biggest.name} needs {biggest.devices} devices but a node has devices_per_node="
                f"{devices_per_node}; a worker cannot span nodes")
    free = [devices_per_node] * nodes
    for spec in sorted(specs, key=lambda s: -s.devices):
        node = next((i for i, f in enumerate(free) if f >= spec.devices), None)
        if node is None:
            return (f"{mode} mode needs {need} devices ({', '.join(f'{s.name}: {s.devices}' for s in specs)}) but "
                    f"nodes={nodes} x devices_per_node={devices_per_node} gives {total} (packed per node); "
                    "lower rollout_parallel, rollout_devices or train_parallel, or add nodes")
        free[node] -= spec.devices
    return None
