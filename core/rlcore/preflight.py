"""Checks before a run: every selected plugin may refuse a combination it cannot run, before anything starts.

`rlcore run` first lets the plugins settle their `auto` options (`settle`), so that config.yaml and the dry
run show the values that run. `rlcore run --dry-run` and the start of every run call `check_run` here: fresh
instances of the selected plugins (constructors only: no model, engine, worker or Ray is started) answer the
`modalities` and `check_run` hooks (see `rlcore.hookspecs`) given the resolved config and the model's
transformers config, read without loading weights. A run that would fail later (a vision-language model on a
backend that cannot host it, a model type a backend cannot load, parallel sizes that do not divide the model)
stops here with one line per problem.
"""

from __future__ import annotations

from typing import Any

from rlcore.config import build_options, merge
from rlcore.errors import ConfigError, PluginError, RLCoreError
from rlcore.plugins import SELECTED_KINDS, Registry, construct, options_class
from rlcore.run_config import ResolvedConfig, resolve
from rlcore.toolkit.tis import settle_tis_cap


def local_registry(cfg: ResolvedConfig) -> Registry:
    """The selected plugins, the trackers and the extras as plain local instances, whatever the placement
    (nothing set up; a tracker whose library is missing refuses here already, a constructor that raises and
    a hook name outside the contract are named with their plugin)."""
    registry = Registry()
    chosen = [(kind, cfg.selection[kind], cfg.classes[kind], cfg.options[kind]) for kind in SELECTED_KINDS]
    chosen += [("tracker", name, cls, cfg.tracker_options[name]) for name, cls in cfg.trackers.items()]
    chosen += [("extra", name, cls, build_options(options_class(cls), None, f"extra.{name}"))
               for name, cls in cfg.extras.items()]
    for kind, name, cls, options in chosen:
        try:
            plugin = construct(cls, options)
        except RLCoreError:
            raise
        except Exception as e:  # noqa: BLE001 - a third-party constructor's failure is named, not a traceback
            raise PluginError(f"{kind} plugin {name!r}: constructing it raised {type(e).__name__}: {e}") from e
        registry.register(kind, name, plugin)
    return registry


def problems(cfg: ResolvedConfig, model_config: Any) -> list[str]:
    """Every problem the selected plugins' `check_run` report for this config and model (empty: all accept)."""
    registry = local_registry(cfg)
    modalities = frozenset(m for found in registry.hook.modalities() for m in found or ())
    answers = registry.hook.check_run(config=cfg.to_dict(), model_config=model_config, modalities=modalities)
    return [line for found in answers for line in found or ()]


def settle(cfg: ResolvedConfig, model_config: Any) -> ResolvedConfig:
    """`cfg` with the values the selected plugins' `settle_options` put in place of their `auto` options, then
    `algo.tis_cap: auto` decided by the two sides' settled precisions (validated again), or `cfg` itself when
    nothing was `auto`."""
    config = cfg.to_dict()
    answers = local_registry(cfg).hook.settle_options(config=config, model_config=model_config)
    changes: dict[str, Any] = {}
    for answer in answers:
        changes = merge(changes, answer or {})
    if (config.get("algo") or {}).get("tis_cap") == "auto":  # decided by the sides' settled precisions
        changes = merge(changes, {"algo": {"tis_cap": settle_tis_cap(merge(config, changes))}})
    return resolve(merge(config, changes)) if changes else cfg


def check_run(cfg: ResolvedConfig, model_config: Any) -> None:
    """Raise a ConfigError listing every problem the selected plugins report (one per line), if any."""
    found = problems(cfg, model_config)
    if found:
        raise ConfigError("this run cannot work: " + found[0] if len(found) == 1 else
                          "this run cannot work:\n" + "\n".join(f"  - {line}" for line in found))
