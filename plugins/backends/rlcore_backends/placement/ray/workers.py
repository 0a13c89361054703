"""The run's Ray workers: start them with their resources, wait for their answers with deadlines, stop them.

Every wait watches all the workers it waits on, so a worker that dies (or never gets its resources, or
stops answering) becomes a `TrainingError` naming it, its plugins, node, process and devices within
seconds, never a hang. An rlcore error raised inside a worker reaches the driver as itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import attrs

from rlcore.errors import RLCoreError, TrainingError
from rlcore_backends.placement.ray.host import HardwarePlugin, PluginHost
from rlcore_backends.placement.ray.layout import WorkerSpec

log = logging.getLogger("rlcore.ray")


@attrs.define(eq=False)
class Worker:
    """A started actor with what the error messages say about it (compared by identity)."""

    spec: WorkerSpec
    actor: Any
    where: dict[str, str] = attrs.field(factory=dict)
    """`PluginHost.describe()`: node, pid, devices."""
    plugins: dict[str, str] = attrs.field(factory=dict)
    """Hosted plugin names by kind."""

    def __str__(self) -> str:
        hosted = ", ".join(f"{k} {n!r}" for k, n in self.plugins.items())
        where = f"node {self.where.get('node', '?')}, pid {self.where.get('pid', '?')}" if self.where else "not started"
        devices = f", devices {self.where['devices']}" if self.where.get("devices") else ""
        return f"Ray worker {self.spec.name} ({hosted}; {where}{devices})"


class Workers:
    """The actors of one run and the waits on them."""

    def __init__(self, call_timeout: float, logs: str) -> None:
        self.call_timeout = call_timeout
        self.logs = logs
        self.all: list[Worker] = []
        self.groups: list[Any] = []
        """Placement groups reserved for colocated training groups."""

    def start(self, specs: Sequence[WorkerSpec], plugins: dict[str, str], hardware: HardwarePlugin, resource: str,
              visible_env: str | None, cpus_per_worker: float, seed: int, timeout: float) -> None:
        """Create one actor per spec, reserving its devices of `resource`, and wait until all are up.
        `plugins` names the plugin of each kind, for messages."""
        import ray

        have = ray.cluster_resources().get(resource, 0.0)
        need = sum(s.devices for s in specs)
        if need > have:
            sizes = ", ".join(f"{s.name}: {s.devices}" for s in specs)
            raise TrainingError(f"the Ray placement needs {need} {resource} ({sizes}) but the Ray cluster has "
                                f"{have:g}; lower placement.rollout_parallel, placement.rollout_devices or "
                                "placement.train_parallel, or add nodes")
        remote = ray.remote(PluginHost)
        packed = self._pack_train_groups(specs, resource, cpus_per_worker, timeout)
        for spec in specs:
            options = {**resource_request(resource, spec.devices, cpus_per_worker), **packed.get(spec.name, {})}
            actor = remote.options(max_restarts=0, **options).remote(hardware, resource, visible_env,
                                                                     seed + spec.replica)
            self.all.append(Worker(spec, actor, plugins={k: plugins[k] for k in spec.kinds}))
        for worker, where in zip(self.all, self.gather([(w, w.actor.describe.remote()) for w in self.all],
                                                       "start-up", timeout)):
            worker.where = where
            log.info("%s started", worker)
        for worker in self.all:
            if worker.spec.train_group:
                ids = [i for name in worker.spec.train_group for i in self.named(name).where["devices"].split(",") if i]
                self.gather([(worker, worker.actor.share_devices.remote(ids))], "start-up", timeout)
                log.info("%s: its backend trains on the devices of %s", worker, ", ".join(worker.spec.train_group))

    def _pack_train_groups(self, specs: Sequence[WorkerSpec], resource: str, cpus_per_worker: float,
                           timeout: float) -> dict[str, dict[str, Any]]:
        """A STRICT_PACK placement group per colocated training group (its workers on one node); returns
        each member's scheduling option."""
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        packed: dict[str, dict[str, Any]] = {}
        for spec in specs:
            if not spec.train_group:
                continue
            group = placement_group([bundle(resource, spec.devices, cpus_per_worker)] * len(spec.train_group),
                                    strategy="STRICT_PACK")
            self.groups.append(group)
            if not group.wait(timeout):
                raise TrainingError(f"Ray could not reserve {len(spec.train_group)} x {spec.devices} {resource} on "
                                    f"one node for {', '.join(spec.train_group)} (the backend's devices) within "
                                    f"{timeout:g} s; check `ray status`, or lower placement.train_parallel")
            for index, name in enumerate(spec.train_group):
                packed[name] = {"scheduling_strategy": PlacementGroupSchedulingStrategy(
                    group, placement_group_bundle_index=index)}
        return packed

    def named(self, name: str) -> Worker:
        """The started worker called `name`."""
        return next(w for w in self.all if w.spec.name == name)

    def share(self, value: Any) -> Any:
        """Put `value` in the object store once; every worker given the reference reads the same copy."""
        import ray

        return ray.put(value)

    def gather(self, calls: Sequence[tuple[Worker, Any]], what: str, timeout: float | None = None) -> list[Any]:
        """The results of remote calls (worker, object ref), in order; the first failure raises at once."""
        import ray

        limit = timeout or self.call_timeout
        deadline = time.monotonic() + limit
        owner = {ref: worker for worker, ref in calls}
        results: dict[Any, Any] = {}
        pending = list(owner)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                worker = owner[pending[0]]
                raise TrainingError(f"{worker} did not finish {what} within {limit:g} s: if it waits for resources, "
                                    f"check the cluster with `ray status`; if it is only slow, raise "
                                    f"placement.start_timeout or placement.call_timeout; its log is in {self.logs}")
            for ref in ready:
                results[ref] = self._get(owner[ref], ref, what)
        return [results[ref] for _, ref in calls]

    def _get(self, worker: Worker, ref: Any, what: str) -> Any:
        """One finished result, with a worker's death or an rlcore error turned into an error naming it."""
        import ray

        try:
            return ray.get(ref)
        except ray.exceptions.RayActorError as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise TrainingError(f"{worker} died during {what}: {reason} Its log is in {self.logs}") from None
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, RLCoreError):
                raise type(e.cause)(f"{e.cause} (in {worker}, during {what})") from None
            raise

    def stop(self) -> None:
        """Kill every actor (their processes end; nothing is restarted)."""
        import ray

        if ray.is_initialized():
            for worker in self.all:
                ray.kill(worker.actor, no_restart=True)
            for group in self.groups:
                ray.util.remove_placement_group(group)
        self.all, self.groups = [], []


def bundle(resource: str, devices: int, cpus_per_worker: float) -> dict[str, float]:
    """A placement-group bundle holding what `resource_request` asks for."""
    return {"CPU": devices} if resource == "CPU" else {"CPU": cpus_per_worker, resource: devices}


def resource_request(resource: str, devices: int, cpus_per_worker: float) -> dict[str, Any]:
    """Ray actor options reserving `devices` of `resource`: CPU cores, GPUs, or a named accelerator (NPU)."""
    if resource == "CPU":
        return {"num_cpus": devices}
    if resource == "GPU":
        return {"num_cpus": cpus_per_worker, "num_gpus": devices}
    return {"num_cpus": cpus_per_worker, "resources": {resource: devices}}
