"""Ray placement: the backend and rollout plugins run as Ray actors, colocated or disaggregated.

`place` returns, for a backend or rollout plugin, a proxy whose hooks forward to the plugin's instances in
Ray workers (`rlcore_backends.placement.ray.proxy`); every other plugin (task, algorithm, hardware) runs in the driver.
`setup` starts Ray (a local instance whose files stay in `<run_dir>/ray`, or a cluster at `address`) and the
workers that `layout` sizes from the options; `teardown` kills the workers and stops Ray.
"""

from __future__ import annotations

from typing import Any, Literal

import attrs

from rlcore import hookimpl
from rlcore.config import check_choice, check_range
from rlcore.context import RunContext
from rlcore.errors import ConfigError
from rlcore_backends.placement.ray.host import HardwarePlugin
from rlcore_backends.placement.ray.layout import fit_problem, worker_specs
from rlcore_backends.placement.ray.proxy import PluginProxy, proxy_class
from rlcore_backends.placement.ray.session import RaySession, start
from rlcore_backends.placement.ray.workers import Worker, Workers

REMOTE_KINDS = ("backend", "rollout")


class RayPlacement:
    """Backend and rollout plugins as Ray actors on a local Ray instance or a cluster."""

    @attrs.define
    class Options:
        mode: Literal["colocated", "disaggregated"] = attrs.field(
            default="colocated", validator=check_choice("colocated", "disaggregated"))
        """colocated: rollout replicas on every worker, the backend on worker 0 sharing its devices (weights
        sync in process); disaggregated: a training worker plus separate rollout workers (weights go
        through Ray's object store after each update)."""
        address: str = ""
        """Ray cluster to join ("auto", "HOST:6379" or "ray://HOST:10001"); empty starts a local Ray instance
        whose files stay in `<run_dir>/ray`."""
        nodes: int = attrs.field(default=1, validator=check_range(1))
        """Nodes the run may use (more than 1 needs `address`)."""
        devices_per_node: int = attrs.field(default=1, validator=check_range(1))
        """Devices per node: CPU cores, GPUs or NPUs, whichever the hardware plugin schedules on."""
        rollout_parallel: int = attrs.field(default=1, validator=check_range(1))
        """Rollout replicas (data parallel): each step's prompts are split evenly over them."""
        rollout_devices: int = attrs.field(default=1, validator=check_range(1))
        """Devices per rollout replica (its engine's tensor-parallel size)."""
        train_parallel: int = attrs.field(default=1, validator=check_range(1))
        """Devices the backend trains on, in one worker (a distributed backend starts its own processes on them)."""
        cpus_per_worker: float = attrs.field(default=1.0, validator=check_range(0.0))
        """CPU cores reserved per worker when the devices are accelerators (on CPU, devices are the cores)."""
        start_timeout: float = attrs.field(default=600.0, validator=check_range(1.0))
        """Seconds the workers may take to get their resources and start."""
        call_timeout: float = attrs.field(default=3600.0, validator=check_range(1.0))
        """Seconds one hook call in a worker (setup, sample, update, ...) may take before the run stops."""

        def __attrs_post_init__(self) -> None:
            problem = fit_problem(self.mode, self.nodes, self.devices_per_node, self.rollout_parallel,
                                  self.rollout_devices, self.train_parallel)
            if problem:
                raise ValueError(problem)

    def __init__(self, options: Options) -> None:
        self.options = options
        self.workers = Workers(options.call_timeout, logs="the Ray session logs")
        """Started in `setup`; the proxies call through it."""
        self.proxies: dict[str, PluginProxy] = {}
        self.hardware: HardwarePlugin | None = None
        self.session: RaySession | None = None

    @hookimpl
    def place(self, kind: str, name: str, cls: type, options: Any) -> Any:
        """A proxy for a backend or rollout plugin; any other plugin is instantiated here."""
        if kind in REMOTE_KINDS:
            proxy = proxy_class(cls)(self.workers, self.hosts, kind, name, cls, options)
            self.proxies[kind] = proxy
            return proxy
        if kind == "hardware":
            self.hardware = HardwarePlugin(name, cls, options)
        return cls(options) if options is not None else cls()

    @hookimpl
    def setup(self, ctx: RunContext) -> None:
        """Start Ray and one actor per worker (resources from the hardware plugin), before the proxies set up."""
        o = self.options
        if o.nodes > 1 and not o.address:
            raise ConfigError(f"placement.nodes={o.nodes} needs a Ray cluster: set placement.address (e.g. auto) "
                              "or use nodes=1")
        resource = ctx.hardware.resource_name()
        self.session = start(ctx.run_dir, o.address, resource, o.nodes * o.devices_per_node)
        self.workers.logs = self.session.logs
        specs = worker_specs(o.mode, set(self.proxies), o.rollout_parallel, o.rollout_devices, o.train_parallel)
        names = {kind: proxy.name for kind, proxy in self.proxies.items()}
        self.workers.start(specs, names, self.hardware, resource, ctx.hardware.visible_devices_env(),
                           o.cpus_per_worker, ctx.seed, o.start_timeout)

    def hosts(self, kind: str) -> list[Worker]:
        """The workers hosting the plugin of `kind`."""
        return [w for w in self.workers.all if kind in w.spec.kinds]

    @hookimpl
    def teardown(self) -> None:
        """Kill the workers and stop the Ray instance this run started (or disconnect from the cluster)."""
        try:
            self.workers.stop()
        finally:
            if self.session is not None:
                self.session.stop()
                self.session = None
