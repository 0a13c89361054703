"""Proxies: what the driver's registry holds for a backend or rollout plugin that runs in Ray workers.

`proxy_class(cls)` builds, per plugin class, a subclass of `PluginProxy` with one `@hookimpl` method for
every hook `cls` implements (found by pluggy's `rlcore_impl` marker, with the same arguments and marker
options), so the core calls the proxy exactly as it would call the plugin. Hooks that need more than
forwarding are `PluginProxy` methods: `setup` adds the plugin to its workers; `sample` splits the prompts
over the rollout replicas and concatenates their batches; `policy_weights` / `sync_weights` move weights
between workers without passing them through the driver; `save_state` / `load_state` also keep each
worker's random generators. Any other hook goes to the plugin's first worker. `export_model` and
`convert_checkpoint` are file conversions called without `setup`: they run in the driver.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs

from rlcore import Interaction, Prompt, RolloutBatch, SamplingParams, Tool, hookimpl
from rlcore.context import RunContext
from rlcore.errors import PluginError
from rlcore_backends.placement.ray.weights import WeightsHandle
from rlcore_backends.placement.ray.workers import Worker, Workers

log = logging.getLogger("rlcore.ray")

TEARDOWN_SECONDS = 60.0
"""How long a worker's teardown may take before the placement kills it anyway."""
ALWAYS = ("setup", "teardown", "save_state", "load_state")
"""Hooks every proxy implements, whether or not its plugin does: they manage the workers themselves."""
SPECIAL = ("sample", "policy_weights", "sync_weights")
"""Hooks implemented by `PluginProxy` methods rather than plain forwarding, when the plugin implements them."""
IN_DRIVER = ("export_model", "convert_checkpoint")
"""Hooks called without `setup` (no workers exist): run on a plugin instance in the driver."""


def implemented_hooks(cls: type) -> dict[str, Callable[..., Any]]:
    """The hook implementations of a plugin class by hook name (a `specname` marker option renames)."""
    found: dict[str, Callable[..., Any]] = {}
    for attr in dir(cls):
        fn = getattr(cls, attr, None)
        opts = getattr(fn, "rlcore_impl", None)
        if opts is None:
            continue
        if opts.get("wrapper") or opts.get("hookwrapper"):
            raise PluginError(f"{cls.__module__}.{cls.__qualname__}.{attr} is a hook wrapper, which cannot run in a "
                              "Ray worker; use placement=local for this plugin")
        found[opts.get("specname") or attr] = fn
    return found


def proxy_class(cls: type) -> type[PluginProxy]:
    """A `PluginProxy` subclass whose hook implementations mirror those of `cls`."""
    hooks = implemented_hooks(cls)
    namespace: dict[str, Any] = {}
    for hook in {*hooks, *ALWAYS}:
        original = hooks.get(hook)
        if hook in ALWAYS or hook in SPECIAL:
            method = _impl(getattr(PluginProxy, hook), original)
        elif hook in IN_DRIVER:
            method = _in_driver(original)
        else:
            method = _forwarder(hook, original)
        namespace[hook] = method
    return type(f"Ray{cls.__name__}", (PluginProxy,), namespace)


def _impl(method: Callable[..., Any], original: Callable[..., Any] | None) -> Callable[..., Any]:
    """A fresh copy of a `PluginProxy` method, marked as a hook implementation with `original`'s marker options."""
    @functools.wraps(method)
    def impl(self: PluginProxy, *args: Any) -> Any:
        return method(self, *args)
    if original is None:
        return hookimpl(impl)
    impl.rlcore_impl = dict(original.rlcore_impl)  # type: ignore[attr-defined]
    return impl


def _forwarder(hook: str, original: Callable[..., Any]) -> Callable[..., Any]:
    """A hook implementation with `original`'s arguments and marker that forwards them by name.

    pluggy passes the arguments an implementation names (those without defaults), positionally and in order."""
    names = [p.name for p in list(inspect.signature(original).parameters.values())[1:]
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]

    @functools.wraps(original)
    def forward(self: PluginProxy, *args: Any) -> Any:
        return self.forward(hook, dict(zip(names, args)))
    return forward


def _in_driver(original: Callable[..., Any]) -> Callable[..., Any]:
    """A hook implementation that runs `original` on the proxy's in-driver plugin instance."""
    @functools.wraps(original)
    def run_here(self: PluginProxy, *args: Any) -> Any:
        return original(self.local_instance(), *args)
    return run_here


def split_evenly(items: Sequence[Any], parts: int) -> list[list[Any]]:
    """Consecutive, non-empty chunks whose sizes differ by at most one (fewer chunks than `parts` if short)."""
    size, extra = divmod(len(items), parts)
    chunks, start = [], 0
    for i in range(parts):
        stop = start + size + (1 if i < extra else 0)
        if stop > start:
            chunks.append(list(items[start:stop]))
        start = stop
    return chunks


class PluginProxy:
    """Stands for one plugin (kind, name, class, options) whose instances live in Ray workers."""

    def __init__(self, workers: Workers, hosts: Callable[[str], list[Worker]], kind: str, name: str, cls: type,
                 options: Any) -> None:
        self.workers, self.hosts = workers, hosts
        self.kind, self.name, self.cls, self.options = kind, name, cls, options
        self.mine: list[Worker] = []
        self.pad_id = 0
        self.local: Any = None

    def setup(self, ctx: RunContext) -> None:
        """Instantiate the plugin in each of its workers, then call its `setup` there with the context
        (absolute paths, since workers do not share the driver's working directory)."""
        self.mine = self.hosts(self.kind)
        self.pad_id = getattr(ctx.model.tokenizer, "pad_token_id", None) or 0
        model = attrs.evolve(ctx.model, path=_absolute(ctx.model.path))
        remote_ctx = attrs.evolve(ctx, run_dir=Path(ctx.run_dir).resolve(), model=model, hardware=None)
        self._on_all("add", self.kind, self.name, self.cls, self.options)
        self._on_all("setup", self.kind, self.workers.share(remote_ctx))

    def teardown(self) -> None:
        """Call the plugin's `teardown` in every worker still alive; the placement then kills the workers."""
        for worker in self.mine:
            try:
                self.workers.gather([(worker, worker.actor.call.remote(self.kind, "teardown", {}))], "teardown",
                                    TEARDOWN_SECONDS)
            except Exception as e:  # noqa: BLE001 - teardown must reach every plugin, also after a worker died
                log.warning("%s: %s teardown failed: %s", worker, self.kind, e)
        self.mine = []

    def _on_all(self, method: str, *args: Any) -> list[Any]:
        """Call a `PluginHost` method on each of this plugin's workers and wait for all."""
        return self.workers.gather([(w, getattr(w.actor, method).remote(*args)) for w in self.mine],
                                   f"{self.kind} {method}")

    def forward(self, hook: str, kwargs: dict[str, Any]) -> Any:
        """Call `hook` on the plugin in its first worker."""
        worker = self.mine[0]
        return self.workers.gather([(worker, worker.actor.call.remote(self.kind, hook, kwargs))], hook)[0]

    def local_instance(self) -> Any:
        """A plugin instance in this process (created on first use), for the hooks in `IN_DRIVER`."""
        if self.local is None:
            self.local = self.cls(self.options) if self.options is not None else self.cls()
        return self.local

    def sample(self, prompts: Sequence[Prompt], params: SamplingParams, tools: Sequence[Tool],
               interaction: Interaction | None) -> RolloutBatch:
        """Prompts split evenly over the rollout replicas (a seeded sample gets seed + replica), batches
        concatenated in prompt order, so group ids stay one per prompt. An interaction goes to each replica
        (refused when the plugin's `sample` does not take one)."""
        if interaction is not None and "interaction" not in inspect.signature(self.cls.sample).parameters:
            raise PluginError(f"rollout plugin {self.name!r} does not run interactions (its sample hook takes no "
                              "'interaction'); choose the hf, vllm or sglang rollout")
        calls = []
        for i, (worker, chunk) in enumerate(zip(self.mine, split_evenly(list(prompts), len(self.mine)))):
            seeded = params if params.seed is None or i == 0 else attrs.evolve(params, seed=params.seed + i)
            kwargs = {"prompts": chunk, "params": seeded, "tools": list(tools), "interaction": interaction}
            calls.append((worker, worker.actor.call.remote(self.kind, "sample", kwargs)))
        return RolloutBatch.concat(self.workers.gather(calls, "sample"), pad_id=self.pad_id)

    def policy_weights(self) -> WeightsHandle:
        """A handle on the worker holding the policy; the weights stay there until a rollout needs them
        (or `snapshot` exports them)."""
        source = self.mine[0]
        return WeightsHandle(source=source, export=functools.partial(self._export, source))

    def _export(self, source: Worker) -> tuple[Any, float]:
        (ref,), megabytes = self.workers.gather([(source, source.actor.export_weights.remote())],
                                                "sync_weights (export)")[0]
        return ref, megabytes

    def sync_weights(self, weights: WeightsHandle) -> dict[str, float]:
        """A replica sharing the backend's worker syncs in process; the others load one export of the
        weights from Ray's object store (a snapshot's export: every replica). Returns `sync/seconds` (all
        replicas) and `sync/megabytes` sent."""
        start = time.perf_counter()
        source, ref, megabytes = weights.source, weights.ref, weights.megabytes
        local = ref is None and source in self.mine
        calls = [(source, source.actor.sync_local.remote())] if local else []
        others = [w for w in self.mine if not (local and w is source)]
        if others and ref is None:
            ref, megabytes = self._export(source)
        calls += [(w, w.actor.load_weights.remote(ref)) for w in others]
        self.workers.gather(calls, "sync_weights")
        return {"sync/seconds": time.perf_counter() - start, "sync/megabytes": megabytes}

    def save_state(self, directory: Path) -> None:
        """The plugin's own state from its first worker, and every worker's random generators."""
        directory = Path(directory).resolve()
        calls = [(self.mine[0], self.mine[0].actor.call.remote(self.kind, "save_state", {"directory": directory}))]
        calls += [(w, w.actor.save_rng.remote(str(directory / f"rng_{w.spec.name}.pkl"))) for w in self.mine]
        self.workers.gather(calls, "save_state")

    def load_state(self, directory: Path) -> None:
        """Restore what `save_state` wrote: the plugin's state, then each worker's generators."""
        directory = Path(directory).resolve()
        calls = [(self.mine[0], self.mine[0].actor.call.remote(self.kind, "load_state", {"directory": directory}))]
        calls += [(w, w.actor.load_rng.remote(str(directory / f"rng_{w.spec.name}.pkl")))
                  for w in self.mine if (directory / f"rng_{w.spec.name}.pkl").exists()]
        self.workers.gather(calls, "load_state")


def _absolute(path: str) -> str:
    """A local model path made absolute; a hub id unchanged."""
    return str(Path(path).resolve()) if path and Path(path).exists() else path
