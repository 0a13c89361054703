"""Finding, selecting and registering plugins.

Plugins are found through entry points, one group per kind (`rlcore.algo`, `rlcore.backend`,
`rlcore.rollout`, `rlcore.task`, `rlcore.hardware`, `rlcore.placement` — where the other plugins run:
in this process, or as Ray actors —, `rlcore.tracker` for experiment trackers, any number of which a
run selects with `trainer.log_to`, `rlcore.extra` for cross-cutting plugins that every run activates
just by being installed, and `rlcore.tool_format` for the tool-call syntaxes a multi-turn rollout reads,
chosen with `rollout.tool_format`). An entry point names a class; the run instantiates it with its typed
options (`cls.Options`, an attrs class) and registers the instance with pluggy. Nothing is imported until
selected, so a broken plugin breaks only the runs that select it.

`RLCORE_DISABLE_PLUGINS="gmpo,task:foo"` hides plugins by name or kind:name.
"""

from __future__ import annotations

import difflib
import os
import sys
import traceback
from collections.abc import Iterator
from importlib import metadata
from typing import Any

import attrs
import pluggy

from rlcore import hookspecs
from rlcore.config import build_options
from rlcore.errors import PluginError, RLCoreError

KINDS = ("algo", "backend", "rollout", "task", "hardware", "placement", "tracker", "extra", "tool_format")
SELECTED_KINDS = ("placement", "hardware", "backend", "rollout", "task", "algo")
"""Kinds with exactly one plugin per run, in setup order."""
FLAG_KINDS = ("algo", "backend", "rollout", "task", "hardware")
"""Kinds `rlcore run` selects with a flag of that name; the others with `--set plugins.KIND=NAME`."""
MANY_KINDS = ("tracker", "extra")
"""Kinds with any number of plugins per run (trackers as `trainer.log_to` selects, every enabled extra),
registered under `kind:name` after the selected ones."""
GROUP = "rlcore.{kind}"
DISABLE_ENV = "RLCORE_DISABLE_PLUGINS"
FAILED_HOOK = "rlcore_failed_hook"
"""Attribute set on an exception raised inside a hook implementation: `kind plugin 'name', hook 'hook'`."""


@attrs.define
class PluginInfo:
    """One installed plugin as `rlcore plugins` shows it."""

    kind: str
    name: str
    distribution: str
    version: str
    target: str
    error: str | None = None
    disabled: bool = False


@attrs.define
class NoOptions:
    """Options of a plugin that declares none."""


def _disabled() -> set[str]:
    return {p.strip() for p in os.environ.get(DISABLE_ENV, "").split(",") if p.strip()}


def is_disabled(kind: str, name: str) -> bool:
    """Whether `RLCORE_DISABLE_PLUGINS` hides this plugin."""
    off = _disabled()
    return name in off or f"{kind}:{name}" in off


def entry_points(kind: str) -> dict[str, metadata.EntryPoint]:
    """Installed entry points of one kind, by plugin name (disabled ones included)."""
    if kind not in KINDS:
        raise PluginError(f"unknown plugin kind {kind!r}; kinds are: {', '.join(KINDS)}")
    return {ep.name: ep for ep in metadata.entry_points(group=GROUP.format(kind=kind))}


def available(kind: str) -> list[str]:
    """Names of the enabled plugins of a kind, sorted."""
    return sorted(n for n in entry_points(kind) if not is_disabled(kind, n))


def load(kind: str, name: str) -> type:
    """Import the plugin class `name` of `kind`, with an error that lists what is installed."""
    eps = entry_points(kind)
    names = available(kind)
    flag = f"--{kind} NAME" if kind in FLAG_KINDS else f"--set plugins.{kind}=NAME"
    choose = {"tracker": "List them in --set trainer.log_to=[NAME,...]",
              "tool_format": "Choose one with --set rollout.tool_format=NAME"}.get(kind, f"Choose one with {flag}")
    if name not in eps:
        raise PluginError(f"unknown {kind} plugin {name!r}; installed {kind} plugins: "
                          f"{', '.join(names) or '(none)'}. {choose}, "
                          f"or pip install the package that provides {name!r}.")
    if is_disabled(kind, name):
        raise PluginError(f"{kind} plugin {name!r} is disabled by {DISABLE_ENV}={os.environ[DISABLE_ENV]!r}; "
                          f"remove it from that variable or choose one of: {', '.join(names) or '(none)'}")
    try:
        obj = eps[name].load()
    except Exception as e:  # noqa: BLE001 - any import failure of third-party code is reported by name
        raise PluginError(f"{kind} plugin {name!r} ({eps[name].value}) failed to import: "
                          f"{type(e).__name__}: {e}. Reinstall it, or choose another of: "
                          f"{', '.join(n for n in names if n != name) or '(none)'}") from e
    if not isinstance(obj, type):
        raise PluginError(f"{kind} plugin {name!r}: entry point {eps[name].value} must name a class, "
                          f"got {type(obj).__name__}")
    return obj


def describe_all() -> Iterator[PluginInfo]:
    """Every installed plugin with its distribution, version and load status."""
    for kind in KINDS:
        for name, ep in sorted(entry_points(kind).items()):
            dist = ep.dist.name if ep.dist else "?"
            version = ep.dist.version if ep.dist else "?"
            info = PluginInfo(kind, name, dist, version, ep.value, disabled=is_disabled(kind, name))
            if not info.disabled:
                try:
                    load(kind, name)
                except PluginError as e:
                    info.error = str(e.__cause__ or e)
            yield info


def unknown_groups() -> list[str]:
    """A warning per installed entry point in an `rlcore.*` group that is no plugin kind (e.g. `rlcore.tasks`):
    rlcore never looks there, so its plugin would be silently absent."""
    known = [GROUP.format(kind=kind) for kind in KINDS]
    warnings = []
    for group in sorted(g for g in metadata.entry_points().groups if g.startswith("rlcore.") and g not in known):
        close = difflib.get_close_matches(group, known, n=1)
        fix = f"did you mean `{close[0]}`?" if close else f"the groups are: {', '.join(known)}"
        for ep in sorted(metadata.entry_points(group=group), key=lambda ep: ep.name):
            dist = ep.dist.name if ep.dist else "?"
            warnings.append(f"entry point {ep.name!r} of {dist} is in the unknown group {ep.group!r}, so rlcore never "
                            f"loads it; {fix}")
    return warnings


def options_class(cls: type) -> type:
    """The attrs options class a plugin declares (an empty one if it declares none)."""
    opts = getattr(cls, "Options", None)
    if opts is None:
        return NoOptions
    if not attrs.has(opts):
        raise PluginError(f"plugin class {cls.__module__}.{cls.__qualname__}: Options must be an attrs class")
    return opts


def instantiate(cls: type, options: dict[str, Any] | None, section: str) -> Any:
    """Build a plugin instance from its class and raw option values."""
    return construct(cls, build_options(options_class(cls), options, section))


def construct(cls: type, options: Any) -> Any:
    """A plugin instance from its class and its typed options (ignored by a plugin without `Options`)."""
    return cls(options) if getattr(cls, "Options", None) is not None else cls()


class Registry:
    """The run's plugin manager: one instance per selected kind plus the trackers and extras, behind typed access.

    `registry.hook.<name>(...)` broadcasts as pluggy does; `registry.call(kind, name, ...)` calls one
    plugin's implementation alone (used for per-plugin checkpoint state).
    """

    def __init__(self, trace: bool = False) -> None:
        self.pm = pluggy.PluginManager("rlcore")
        self.pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, Any] = {}
        self.names: dict[str, str] = {}
        if trace:
            self.pm.trace.root.setwriter(lambda msg: sys.stderr.write(f"[rlcore trace] {msg}"))
            self.pm.enable_tracing()
        self.pm.add_hookcall_monitoring(lambda *_: None, self._blame)

    def _describe(self, key: str) -> str:
        kind = key.split(":")[0]
        return f"{kind} plugin {self.names.get(key, key.split(':')[-1])!r}"

    def _blame(self, outcome: Any, hook: str, impls: Any, _kwargs: Any) -> None:
        """Mark an exception raised inside a hook implementation with the plugin and hook it came from (the
        innermost implementation on its traceback, else the only one called), for a one-line error."""
        exc = outcome.exception
        if not isinstance(exc, Exception) or isinstance(exc, RLCoreError) or hasattr(exc, FAILED_HOOK):
            return
        codes = {getattr(impl.function, "__code__", None): impl for impl in impls}
        raised = [codes[frame.f_code] for frame, _ in traceback.walk_tb(exc.__traceback__) if frame.f_code in codes]
        impl = raised[-1] if raised else impls[0] if len(impls) == 1 else None
        if impl is not None:
            setattr(exc, FAILED_HOOK, f"{self._describe(impl.plugin_name)}, hook {hook!r}")

    @property
    def hook(self) -> Any:
        return self.pm.hook

    def register(self, kind: str, name: str, plugin: Any) -> None:
        """Add a plugin instance under `kind`; hook names are checked against the contract."""
        key = f"{kind}:{name}" if kind in MANY_KINDS else kind
        specs = hookspecs.all_hook_names()
        for attr in dir(plugin):
            if attr not in specs and self.pm.parse_hookimpl_opts(plugin, attr) is not None:
                close = difflib.get_close_matches(attr, specs, n=1)
                hint = f"did you mean `{close[0]}`?" if close else f"the hooks are: {', '.join(specs)}"
                raise PluginError(f"{kind} plugin {name!r} implements {attr!r}, which is not an rlcore hook; {hint}")
        try:
            self.pm.register(plugin, name=key)
            self.pm.check_pending()
        except pluggy.PluginValidationError as e:
            raise PluginError(f"{kind} plugin {name!r} does not fit the hook contract: {e}") from None
        self.plugins[key] = plugin
        self.names[key] = name

    def call(self, key: str, hook: str, **kwargs: Any) -> Any:
        """Call `hook` on the plugin registered under `key` only; None if it does not implement it."""
        plugin = self.plugins[key]
        impl = getattr(plugin, hook, None)
        if impl is None or getattr(impl, "rlcore_impl", None) is None:
            return None
        others = [p for k, p in self.plugins.items() if k != key]
        return self.pm.subset_hook_caller(hook, remove_plugins=others)(**kwargs)

    def require(self, kind: str, hook: str, /, **kwargs: Any) -> Any:
        """Broadcast a hook that the selected `kind` plugin must implement; a clear error if it does not."""
        result = getattr(self.pm.hook, hook)(**kwargs)
        if result is None:
            raise PluginError(f"{kind} plugin {self.names.get(kind, '?')!r} does not implement the {hook!r} "
                              f"hook, which this command needs from every {kind} plugin")
        return result

    def keys(self) -> list[str]:
        """Registered plugin keys in setup order (placement, hardware, backend, rollout, task, algo, then
        trackers and extras in registration order)."""
        order = {k: i for i, k in enumerate(SELECTED_KINDS)}
        return sorted(self.plugins, key=lambda k: order.get(k, len(order)))

    def accepts(self, kind: str, hook: str, argument: str) -> bool:
        """Whether the plugin registered under `kind` implements `hook` with a parameter named `argument`
        (pluggy hands an implementation only the arguments it names)."""
        plugin = self.plugins.get(kind)
        return any(impl.plugin is plugin and argument in impl.argnames
                   for impl in getattr(self.pm.hook, hook).get_hookimpls())

    def implements(self, kind: str, hook: str) -> bool:
        """Whether the plugin registered under `kind` implements `hook`."""
        impl = getattr(self.plugins.get(kind), hook, None)
        return impl is not None and getattr(impl, "rlcore_impl", None) is not None


def hook_failure(exc: BaseException) -> str | None:
    """One line for an exception raised inside a plugin's hook (the plugin, the hook, what it raised), or
    None when it was not raised in one; the traceback is for `--debug`."""
    where = getattr(exc, FAILED_HOOK, None)
    if where is None:
        return None
    first = (str(exc).splitlines() or [""])[0]
    return f"{where} raised {type(exc).__name__}: {first} (--debug shows the traceback)"


def select_hardware(requested: str) -> str:
    """Resolve `--hardware auto` to the first available of cuda, npu, then any other, then cpu."""
    if requested != "auto":
        return requested
    names = available("hardware")
    preferred = [n for n in ("cuda", "npu") if n in names] + [n for n in names if n not in ("cuda", "npu", "cpu")]
    for name in preferred:
        try:
            plugin = instantiate(load("hardware", name), None, "hardware")
        except PluginError:
            continue
        check = getattr(plugin, "hardware_available", None)
        if check is not None and check():
            return name
    if "cpu" in names:
        return "cpu"
    raise PluginError("no hardware plugin is available; install rlcore-hardware (pip install -e plugins/hardware)")
