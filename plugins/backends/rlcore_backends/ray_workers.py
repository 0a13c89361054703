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
from rlcore_backends.ray_host import HardwarePlugin, PluginHost
from rlcore_backends.ray_layout import WorkerSpec

log = logging.getLogger("rlcore.ray")


@attrs.define
class Worker:
    """A started actor with what the error messages say about it."""

    spec: WorkerSpec
    actor: Any
    where: dict[str, str] = attrs.field(factory=dict)
    """`PluginHost.describe()`: node, host, pid, devices."""
    plugins: dict[str, str] = attrs.field(factory=dict)
    """Hosted plugin names by kind (filled as proxies add them)."""

    def __str__(self) -> str:
        hosted = ", ".join(f"{k} {n!r}" for k, n in self.plugins.items()) or "no plugin yet"
        where = f"node {self.where.get('node', '?')}, pid {self.where.get('pid', '?')}" if self.where else "not started"
        devices = f", devices {self.where['devices']}" if self.where.get("devices") else ""
        return f"Ray worker {self.spec.name} ({hosted}; {where}{devices})"


class Workers:
    """The actors of one run and the waits on them."""

    def __init__(self, call_timeout: float, logs: str) -> None:
        self.call_timeout = call_timeout
        self.logs = logs
        self.all: list[Worker] = []

    def start(self, specs: Sequence[WorkerSpec], hardware: HardwarePlugin, resource: str, visible_env: str | None,
              cpus_per_worker: float, seed: int, timeout: float) -> None:
        """Create one actor per spec, reserving its devices of `resource`, and wait until all are up."""
        import ray

        have = ray.cluster_resources().get(resource, 0.0)
        need = sum(s.devices for s in specs)
        if need > have:
            raise TrainingError(f"the Ray placement needs {need} {resource} ({', '.join(f'{s.name}: {s.devices}' for s in specs)}) "
                                f"but the Ray cluster has {have:g}; lower placement.rollout_parallel, "
                                "placement.rollout_devices or placement.train_parallel, or add nodes")
        remote = ray.remote(PluginHost)
        for spec in specs:
            amount = resource_request(resource, spec.devices, cpus_per_worker)
            actor = remote.options(max_restarts=0, **amount).remote(hardware, resource, visible_env, seed + spec.replica)
            self.all.append(Worker(spec, actor))
        for worker, where in zip(self.all, self.gather([(w, w.actor.describe.remote()) for w in self.all],
                                                       "start-up", timeout)):
            worker.where = where
            log.info("%s started", worker)

    def gather(self, calls: Sequence[tuple[Worker, Any]], what: str, timeout: float | None = None) -> list[Any]:
        """The results of remote calls (worker, object ref), in order; the first failure raises at once."""
        import ray

        deadline = time.monotonic() + (timeout or self.call_timeout)
        owner = {ref: worker for worker, ref in calls}
        results: dict[Any, Any] = {}
        pending = list(owner)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                worker = owner[pending[0]]
                raise TrainingError(f"{worker} did not finish {what} within {timeout or self.call_timeout:g} s "
                                    f"(placement.{'start_timeout' if timeout else 'call_timeout'}); if it waits for "
                                    f"resources, check the cluster with `ray status`; its log is in {self.logs}")
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

        for worker in self.all:
            ray.kill(worker.actor, no_restart=True)
        self.all = []


def resource_request(resource: str, devices: int, cpus_per_worker: float) -> dict[str, Any]:
    """Ray actor options reserving `devices` of `resource`: CPU cores, GPUs, or a named accelerator (NPU)."""
    if resource == "CPU":
        return {"num_cpus": devices}
    if resource == "GPU":
        return {"num_cpus": cpus_per_worker, "num_gpus": devices}
    return {"num_cpus": cpus_per_worker, "resources": {resource: devices}}
