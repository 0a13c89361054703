"""The Ray placement without a Ray cluster: sizes, proxies mirroring hooks, and the whole proxy <-> worker path
with real plugins, the actors replaced by inline stand-ins (end-to-end runs on real Ray: test_placement_ray_runs)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import attrs
import pytest
import torch
from click.testing import CliRunner

from rlcore import Prompt, SamplingParams, UpdatePlan, hookimpl
from rlcore.cli import main
from rlcore.config import build_options
from rlcore.context import RunContext
from rlcore.errors import ConfigError, PluginError
from rlcore.plugins import Registry, load
from rlcore_backends.placement.ray import host as ray_host
from rlcore_backends.rollout.hf.rollout import HFRollout
from rlcore_backends.placement.ray.placement import RayPlacement
from rlcore_backends.placement.ray.host import HardwarePlugin, PluginHost
from rlcore_backends.placement.ray.layout import fit_problem, worker_specs
from rlcore_backends.placement.ray.proxy import proxy_class, split_evenly
from rlcore_backends.placement.ray.session import RaySession, short_link
from rlcore_backends.placement.ray.workers import Worker, Workers, resource_request
from rlcore_backends.update.torch.backend import TorchBackend

# ---- sizes ------------------------------------------------------------------------------------------


def test_worker_specs_colocated_put_the_backend_on_worker_0():
    specs = worker_specs("colocated", {"backend", "rollout"}, rollout_parallel=3, rollout_devices=2, train_parallel=2)
    assert [(s.name, s.devices, s.kinds, s.replica, s.train_group) for s in specs] == [
        ("worker-0", 2, ("backend", "rollout"), 0, ()), ("worker-1", 2, ("rollout",), 1, ()),
        ("worker-2", 2, ("rollout",), 2, ())]
    wide = worker_specs("colocated", {"backend", "rollout"}, rollout_parallel=8, rollout_devices=1, train_parallel=4)
    assert wide[0].train_group == ("worker-0", "worker-1", "worker-2", "worker-3")
    assert all(not s.train_group for s in wide[1:])
    only_rollout = worker_specs("colocated", {"rollout"}, 2, 1, 1)  # `rlcore eval` places no backend
    assert [s.kinds for s in only_rollout] == [("rollout",), ("rollout",)]


def test_worker_specs_disaggregated_separate_training_and_rollout():
    specs = worker_specs("disaggregated", {"backend", "rollout"}, rollout_parallel=2, rollout_devices=1,
                         train_parallel=4)
    assert [(s.name, s.devices, s.kinds, s.replica) for s in specs] == [
        ("train-0", 4, ("backend",), 0), ("rollout-0", 1, ("rollout",), 0), ("rollout-1", 1, ("rollout",), 1)]


@pytest.mark.parametrize(("sizes", "fragment"), [
    (dict(mode="disaggregated", nodes=1, devices_per_node=1), "needs 2 devices"),
    (dict(mode="colocated", nodes=1, devices_per_node=8, rollout_parallel=3, rollout_devices=4), "needs 12 devices"),
    (dict(mode="colocated", nodes=1, devices_per_node=8, train_parallel=2),
     "train_parallel=2 > rollout_parallel x rollout_devices = 1"),
    (dict(mode="colocated", nodes=1, devices_per_node=8, rollout_parallel=4, rollout_devices=2, train_parallel=3),
     "not a multiple of rollout_devices=2"),
    (dict(mode="disaggregated", nodes=2, devices_per_node=4, train_parallel=8), "train-0 needs 8 devices on one node"),
    # the backend's group of 2 workers x 2 devices sits on one node: 10 devices in 2 nodes of 5 hold 5 workers of
    # 2, but not the group plus 3 workers
    (dict(mode="colocated", nodes=2, devices_per_node=5, rollout_parallel=5, rollout_devices=2, train_parallel=4),
     "(worker-0+worker-1: 4, worker-2: 2"),
    # 3 workers of 3 devices fit 10 devices in total, but not 2 nodes of 5 (packed per node)
    (dict(mode="colocated", nodes=2, devices_per_node=5, rollout_parallel=3, rollout_devices=3), "packed per node"),
])
def test_sizes_that_do_not_fit_are_named(sizes, fragment):
    full = dict(rollout_parallel=1, rollout_devices=1, train_parallel=1) | sizes
    assert fragment in fit_problem(**full)


@pytest.mark.parametrize("sizes", [
    dict(mode="colocated", nodes=1, devices_per_node=8, rollout_parallel=4, rollout_devices=2, train_parallel=2),
    dict(mode="disaggregated", nodes=1, devices_per_node=8, rollout_parallel=2, rollout_devices=2, train_parallel=4),
    dict(mode="disaggregated", nodes=8, devices_per_node=8, rollout_parallel=8, rollout_devices=4, train_parallel=8),
])
def test_sizes_that_fit(sizes):
    assert fit_problem(**sizes) is None


def test_options_validation_rejects_what_does_not_fit():
    with pytest.raises(ConfigError, match=r"placement: .*needs 2 devices.*devices_per_node=1"):
        build_options(RayPlacement.Options, {"mode": "disaggregated"}, "placement")
    assert build_options(RayPlacement.Options, {"mode": "disaggregated", "devices_per_node": 2}, "placement")


def test_dry_run_checks_parallel_sizes():
    runner = CliRunner()
    bad = runner.invoke(main, ["run", "--dry-run", "--set", "plugins.placement=ray", "--set",
                               "placement.mode=disaggregated"])
    assert bad.exit_code == 2 and "needs 2 devices" in bad.output
    good = runner.invoke(main, ["run", "--dry-run", "--set", "plugins.placement=ray", "--set",
                                "placement.mode=disaggregated", "--set", "placement.devices_per_node=2"])
    assert good.exit_code == 0, good.output
    assert "mode: disaggregated" in good.output


def test_resource_requests_follow_the_hardware_resource():
    assert resource_request("CPU", 2, 1.0) == {"num_cpus": 2}
    assert resource_request("GPU", 4, 2.0) == {"num_cpus": 2.0, "num_gpus": 4}
    assert resource_request("NPU", 8, 1.0) == {"num_cpus": 1.0, "resources": {"NPU": 8}}


def test_short_link_only_for_paths_too_long_for_ray_sockets(tmp_path):
    assert short_link(Path("/tmp/run/ray")) is None
    deep = tmp_path / ("d" * 60) / "ray"
    deep.mkdir(parents=True)
    link = short_link(deep)
    assert link is not None and link.resolve() == deep.resolve() and len(str(link)) < 30
    RaySession(temp_dir=deep, link=link, owned=False).stop()
    assert not link.parent.exists() and deep.is_dir()


def test_split_evenly_keeps_order_and_skips_empty_chunks():
    assert split_evenly(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert split_evenly([1], 3) == [[1]]


# ---- proxies mirror the plugin's hooks ---------------------------------------------------------


class Recorder:
    """A backend whose hooks record what they receive (argument subsets and order differ from the spec)."""

    @hookimpl(tryfirst=True)
    def update(self, plan, batch):
        return {"epochs": float(plan.epochs), "rows": float(len(batch))}

    @hookimpl
    def logprobs(self, batch, reference=False):
        return torch.full(batch.response_ids.shape, -1.0 if reference else -2.0)

    @hookimpl
    def export_model(self, checkpoint, out):
        return Path(out) / "exported"


def test_proxy_registers_every_hook_of_the_plugin_with_its_arguments():
    proxy = proxy_class(Recorder)(Workers(1.0, ""), lambda kind: [], "backend", "rec", Recorder, None)
    registry = Registry()
    registry.register("backend", "rec", proxy)
    impls = {name: getattr(registry.hook, name).get_hookimpls()[0]
             for name in ("update", "logprobs", "export_model", "setup", "teardown", "save_state", "load_state")}
    assert impls["update"].argnames == ("plan", "batch") and impls["update"].tryfirst
    assert impls["logprobs"].argnames == ("batch",)  # `reference` has a default: pluggy does not pass it
    assert impls["setup"].argnames == ("ctx",)
    assert not registry.implements("backend", "sample") and not registry.implements("backend", "policy_weights")
    assert type(proxy).__name__ == "RayRecorder"


def test_driver_side_hooks_run_without_workers(tmp_path):
    proxy = proxy_class(Recorder)(Workers(1.0, ""), lambda kind: [], "backend", "rec", Recorder, None)
    registry = Registry()
    registry.register("backend", "rec", proxy)
    assert registry.hook.export_model(checkpoint=tmp_path, out=tmp_path, ctx=None) == tmp_path / "exported"


def test_hook_wrappers_cannot_be_placed():
    class Wrapping:
        @hookimpl(wrapper=True)
        def sample(self, prompts):
            return (yield)

    with pytest.raises(PluginError, match="hook wrapper"):
        proxy_class(Wrapping)


# ---- the proxy <-> worker path with inline workers ------------------------------------------------


class InlineActor:
    """Stands for a Ray actor handle: `actor.method.remote(*args)` runs the host's method at once."""

    def __init__(self, host: PluginHost) -> None:
        self.host = host

    def __getattr__(self, name: str) -> Any:
        return SimpleNamespace(remote=getattr(self.host, name))


class InlineWorkers(Workers):
    """Results are already there; the object store is the identity."""

    def share(self, value: Any) -> Any:
        return value

    def gather(self, calls, what, timeout=None):
        return [result for _, result in calls]


@pytest.fixture
def inline_cluster(monkeypatch):
    """Build workers (name, kinds) as PluginHosts in this process, on the CPU hardware plugin."""
    monkeypatch.setattr(ray_host, "expose_devices", lambda resource, env: None)
    monkeypatch.setattr(ray_host, "to_object_store", lambda value: value)
    cpu = HardwarePlugin("cpu", load("hardware", "cpu"), None)

    def build(*layout: tuple[str, tuple[str, ...]]) -> tuple[InlineWorkers, list[Worker]]:
        specs = worker_specs("colocated", {"rollout"}, len(layout), 1, 1)
        workers = [Worker(attrs.evolve(spec, name=name, kinds=kinds), InlineActor(PluginHost(cpu, "CPU", None, seed=i)))
                   for i, (spec, (name, kinds)) in enumerate(zip(specs, layout))]
        return InlineWorkers(10.0, ""), workers
    return build


def make_proxies(workers: InlineWorkers, hosts: list[Worker]) -> Registry:
    """A driver registry holding proxies of the torch backend and the hf rollout, as the ray placement places them."""
    registry = Registry()

    def on(kind: str) -> list[Worker]:
        return [w for w in hosts if kind in w.spec.kinds]
    for kind, name, cls, options in [("backend", "torch", TorchBackend, TorchBackend.Options(lr=1e-2)),
                                     ("rollout", "hf", HFRollout, HFRollout.Options())]:
        registry.register(kind, name, proxy_class(cls)(workers, on, kind, name, cls, options))
    return registry


def prompts(count: int) -> list[Prompt]:
    return [Prompt(messages=[{"role": "user", "content": f"{i}+1="}], answer=str(i + 1), id=str(i))
            for i in range(count)]


def hosted(worker: Worker, kind: str) -> Any:
    return worker.actor.host.registry.plugins[kind]


def set_up(registry: Registry, ctx: RunContext) -> Registry:
    for key in ("backend", "rollout"):
        registry.call(key, "setup", ctx=ctx)
    return registry


def train_once(registry: Registry) -> dict[str, float]:
    """sample, an update with random advantages and a weight sync, through the proxies as the loop calls them."""
    batch = registry.require("rollout", "sample", prompts=prompts(5), params=SamplingParams(n=2, max_new_tokens=4),
                             tools=[], interaction=None)
    batch.validate()
    assert batch.group_ids.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert [p.id for p in batch.prompts] == [str(i // 2) for i in range(10)]
    batch.advantages = torch.randn(batch.response_ids.shape, generator=torch.Generator().manual_seed(0)) \
        * batch.response_mask
    from rlcore_algorithms.grpo import GRPO

    loss = GRPO(GRPO.Options()).policy_loss()
    registry.require("backend", "update", batch=batch, loss=loss, plan=UpdatePlan())
    return registry.hook.sync_weights(weights=registry.hook.policy_weights())


def assert_synced(trainer: Worker, replicas: list[Worker]) -> None:
    want = hosted(trainer, "backend").model.state_dict()
    for replica in replicas:
        got = hosted(replica, "rollout").model.state_dict()
        assert all(torch.equal(want[k], got[k]) for k in want), replica.spec.name


def test_colocated_proxies_sample_in_parallel_and_sync_in_process_and_through_the_store(inline_cluster,
                                                                                       rlcore_context):
    workers, hosts = inline_cluster(("worker-0", ("backend", "rollout")), ("worker-1", ("rollout",)))
    registry = set_up(make_proxies(workers, hosts), rlcore_context)
    before = {k: v.clone() for k, v in hosted(hosts[1], "rollout").model.state_dict().items()}
    metrics = train_once(registry)
    assert metrics["sync/megabytes"] > 0.1 and metrics["sync/seconds"] > 0  # worker-1 got an export
    assert_synced(hosts[0], hosts)
    assert hosted(hosts[0], "rollout").model is not hosted(hosts[0], "backend").model
    assert any(not torch.equal(before[k], v) for k, v in hosted(hosts[1], "rollout").model.state_dict().items())


def test_disaggregated_proxies_sync_through_one_export(inline_cluster, rlcore_context):
    workers, hosts = inline_cluster(("train-0", ("backend",)), ("rollout-0", ("rollout",)), ("rollout-1", ("rollout",)))
    registry = set_up(make_proxies(workers, hosts), rlcore_context)
    metrics = train_once(registry)
    assert metrics["sync/megabytes"] == pytest.approx(
        sum(t.numel() * 4 for t in hosted(hosts[0], "backend").model.state_dict().values()) / 2**20)
    assert_synced(hosts[0], hosts[1:])


def test_state_and_every_workers_generators_are_saved_and_restored(inline_cluster, rlcore_context, tmp_path):
    workers, hosts = inline_cluster(("worker-0", ("backend", "rollout")), ("worker-1", ("rollout",)))
    registry = set_up(make_proxies(workers, hosts), rlcore_context)
    train_once(registry)
    for key in ("backend", "rollout"):
        (tmp_path / key).mkdir()
        registry.call(key, "save_state", directory=tmp_path / key)
    assert (tmp_path / "backend" / "trainer.pt").is_file()
    assert sorted(p.name for p in (tmp_path / "rollout").iterdir()) == ["rng_worker-0.pkl", "rng_worker-1.pkl"]
    params = SamplingParams(n=2, max_new_tokens=4)
    first = registry.require("rollout", "sample", prompts=prompts(4), params=params, tools=[], interaction=None)
    registry.call("rollout", "load_state", directory=tmp_path / "rollout")
    again = registry.require("rollout", "sample", prompts=prompts(4), params=params, tools=[], interaction=None)
    assert first.texts == again.texts and torch.equal(first.rollout_logprobs, again.rollout_logprobs)
