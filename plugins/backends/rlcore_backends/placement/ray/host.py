"""The Ray actor that hosts plugin instances (a backend, a rollout replica, or both) and calls their hooks.

It keeps its own `Registry` holding the hosted plugins plus an instance of the run's hardware plugin, so
hooks are called exactly as the core calls them in one process (pluggy passes each implementation only
the arguments it names) and `ctx.hardware` answers inside the worker.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import attrs
import torch

from rlcore.checkpoint import load_rng, save_rng
from rlcore.context import Hardware, RunContext
from rlcore.plugins import Registry
from rlcore_backends.placement.ray.weights import WeightsPayload


@attrs.define(frozen=True)
class HardwarePlugin:
    """The run's hardware plugin as `place` received it, rebuilt in every worker."""

    name: str
    cls: type
    options: Any

    def instance(self) -> Any:
        """A new instance with the run's options."""
        return self.cls(self.options) if self.options is not None else self.cls()


def expose_devices(resource: str, visible_env: str | None) -> None:
    """Set `visible_env` to the accelerators Ray assigned this actor, where Ray has not set it itself."""
    import ray

    ids = ray.get_runtime_context().get_accelerator_ids().get(resource, [])
    if visible_env and ids and visible_env not in os.environ:
        os.environ[visible_env] = ",".join(ids)


def to_object_store(value: Any) -> Any:
    """`ray.put`: the reference other workers read `value` from."""
    import ray

    return ray.put(value)


class PluginHost:
    """One worker process: plugin instances registered in a local pluggy registry."""

    def __init__(self, hardware: HardwarePlugin, resource: str, visible_env: str | None, seed: int) -> None:
        """Expose the devices Ray assigned, seed every generator, quiet progress bars (a worker's output is
        interleaved into the driver's log)."""
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        expose_devices(resource, visible_env)
        self.resource, self.visible_env = resource, visible_env
        self.registry = Registry()
        self.registry.register("hardware", hardware.name, hardware.instance())
        self.hardware = Hardware(self.registry.hook, hardware.name)
        self.hardware_set_up = False
        random.seed(seed)
        torch.manual_seed(seed)
        self.hardware.manual_seed(seed)

    def describe(self) -> dict[str, str]:
        """Where this worker runs: node address, process id, and the device ids Ray assigned it."""
        import ray

        return {"node": ray.util.get_node_ip_address(), "pid": str(os.getpid()),
                "devices": ",".join(ray.get_runtime_context().get_accelerator_ids().get(self.resource, []))}

    def share_devices(self, ids: list[str]) -> None:
        """Colocated training group: let this worker's backend (and the processes it starts) see `ids`, its
        own devices and those of the other workers of its group, before anything initialises them."""
        if self.visible_env and ids:
            os.environ[self.visible_env] = ",".join(ids)

    def add(self, kind: str, name: str, cls: type, options: Any) -> None:
        """Instantiate a plugin here with its typed options and register it under its kind."""
        self.registry.register(kind, name, cls(options) if options is not None else cls())

    def setup(self, kind: str, ctx: RunContext) -> None:
        """Call the hosted plugin's `setup` with the run context, its hardware facade answering here."""
        ctx = attrs.evolve(ctx, hardware=self.hardware)
        if not self.hardware_set_up:
            self.registry.call("hardware", "setup", ctx=ctx)
            self.hardware_set_up = True
        self.call(kind, "setup", {"ctx": ctx})

    def call(self, kind: str, hook: str, kwargs: dict[str, Any]) -> Any:
        """One hook of one hosted plugin; a collected hook's single answer is unwrapped from its list."""
        result = self.registry.call(kind, hook, **kwargs)
        if getattr(self.registry.hook, hook).spec.opts.get("firstresult"):
            return result
        return result[0] if result else None

    def sync_local(self) -> dict[str, float]:
        """Colocated: hand the backend's live weights to the rollout in this process, as the core does locally."""
        weights = self.call("backend", "policy_weights", {})
        return self.call("rollout", "sync_weights", {"weights": weights}) or {}

    def export_weights(self) -> tuple[list[Any], float]:
        """Put the backend's weights (CPU tensors) in the object store once; returns the reference (in a list,
        so Ray hands the driver the reference, not the weights) and the megabytes."""
        payload = WeightsPayload.pack(self.call("backend", "policy_weights", {}))
        return [to_object_store(payload)], payload.megabytes

    def load_weights(self, payload: WeightsPayload) -> dict[str, float]:
        """Load weights another worker exported into the hosted rollout."""
        return self.call("rollout", "sync_weights", {"weights": payload.unpack()}) or {}

    def save_rng(self, path: str) -> None:
        """This process's Python and torch random states (what the rollout samples with), for resuming."""
        save_rng(Path(path))

    def load_rng(self, path: str) -> None:
        """Restore what `save_rng` wrote."""
        load_rng(Path(path))
