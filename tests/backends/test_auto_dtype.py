"""`dtype: auto` (the torch backend's and the hf rollout's default): the choice between float32 and
bfloat16_matched from measured timings, made for both sides at once, cached per machine, and written into
config.yaml as the dtype that ran."""

import json

import attrs
import pytest
import torch
import yaml
from click.testing import CliRunner

from rlcore.cli import main
from rlcore.config import build_options
from rlcore.models import load_model, read_config
from rlcore.testing import make_context
from rlcore_backends.common import auto_dtype
from rlcore_backends.common.matched import MatchedLinear
from rlcore_backends.rollout.hf.rollout import HFRollout
from rlcore_backends.update.torch.backend import TorchBackend

PAIR = {"plugins": {"backend": "torch", "rollout": "hf"}, "backend": {"dtype": "auto"}, "rollout": {"dtype": "auto"}}
TINY = {(64, 64): 8, (64, 256): 4, (256, 64): 2}


def probe(train: float, decode: float) -> dict:
    """A measurement in which bfloat16_matched runs `train` and `decode` times float32's speed."""
    return {"float32": {"train": 1.0, "decode": 1.0},
            "bfloat16_matched": {"train": 1.0 / train, "decode": 1.0 / decode}, "chunk": 512}


def no_shapes():
    raise AssertionError("nothing is measured when the pair decides")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh cache directory; returns the cache file's path."""
    monkeypatch.setenv("RLCORE_CACHE_DIR", str(tmp_path / "cache"))
    return auto_dtype.cache_path()


@pytest.fixture
def measures(cache, monkeypatch):
    """Replace the measurement by one that favours bfloat16_matched and records the shapes it was asked for."""
    calls = []

    def fake(counts):
        calls.append(counts)
        return probe(train=2.0, decode=1.2)

    monkeypatch.setattr(auto_dtype, "measure", fake)
    return calls


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_matched_needs_the_margin_in_the_trainer_pass_and_no_loss_in_decode():
    assert auto_dtype.decide(probe(train=2.0, decode=1.0)).dtype == "bfloat16_matched"
    slow_decode = auto_dtype.decide(probe(train=2.0, decode=0.8))
    assert slow_decode.dtype == "float32" and "0.80x in decode" in slow_decode.reason
    assert auto_dtype.decide(probe(train=1.05, decode=1.5)).dtype == "float32"
    unmeasured = {"float32": {"train": 1.0, "decode": 1.0}, "why": "a bfloat16 GEMM runs 0.25x float32's speed"}
    assert auto_dtype.decide(unmeasured) == auto_dtype.Choice("float32", unmeasured["why"])


def test_the_pair_decides_before_anything_is_measured():
    follows = auto_dtype.choose({**PAIR, "rollout": {"dtype": "bfloat16_matched"}}, "backend", no_shapes)
    assert follows.dtype == "bfloat16_matched" and "rollout.dtype" in follows.reason
    assert auto_dtype.choose({**PAIR, "backend": {"dtype": "float32"}}, "rollout", no_shapes).dtype == "float32"
    for kind, other in (("backend", "fsdp"), ("rollout", "vllm")):
        config = {**PAIR, "plugins": {**PAIR["plugins"], kind: other}}
        choice = auto_dtype.choose(config, "backend", no_shapes)
        assert choice.dtype == "float32" and repr(other) in choice.reason
    assert auto_dtype.choose({}, "rollout", no_shapes).dtype == "float32"  # a plugin set up alone


def test_unreadable_shapes_give_float32(measures):
    choice = auto_dtype.choose(PAIR, "backend", lambda: None)
    assert choice.dtype == "float32" and "shapes could not be read" in choice.reason and not measures


def test_measured_once_per_machine_and_cached(cache, measures):
    assert auto_dtype.choose(PAIR, "backend", lambda: TINY).dtype == "bfloat16_matched"
    assert auto_dtype.choose(PAIR, "rollout", lambda: TINY).dtype == "bfloat16_matched"
    assert measures == [TINY]
    stored = json.loads(cache.read_text())
    assert list(stored) == [f"{auto_dtype.machine()} | shapes {sorted(TINY.items())}"]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # another thread count is another machine to the probe
        auto_dtype.choose(PAIR, "backend", lambda: TINY)
    finally:
        torch.set_num_threads(threads)
    assert len(measures) == 2 and len(json.loads(cache.read_text())) == 2


def test_a_corrupt_cache_is_measured_again_and_rewritten(cache, measures):
    cache.parent.mkdir(parents=True)
    cache.write_text('{"cut short')
    assert auto_dtype.choose(PAIR, "backend", lambda: TINY).dtype == "bfloat16_matched"
    assert len(measures) == 1 and len(json.loads(cache.read_text())) == 1


def test_an_unwritable_cache_still_chooses(tmp_path, monkeypatch, measures):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("RLCORE_CACHE_DIR", str(blocker / "cache"))  # a directory under a file cannot exist
    assert auto_dtype.choose(PAIR, "backend", lambda: TINY).dtype == "bfloat16_matched"


def test_the_real_probe_on_this_machine(cache):
    """Whatever this CPU is, the probe times float32, times bfloat16_matched only where a bf16 GEMM can win,
    and never picks plain bfloat16."""
    found = auto_dtype.measure(TINY)
    assert found["float32"]["train"] > 0 and found["float32"]["decode"] > 0
    assert ("bfloat16_matched" in found) != ("why" in found)
    if "bfloat16_matched" in found:
        assert found["chunk"] in (256, 1024, 512, 128, 64) and found["bfloat16_matched"]["train"] > 0
    assert auto_dtype.decide(found).dtype in ("float32", "bfloat16_matched")


def test_the_config_and_the_loaded_model_key_the_same_shapes(tmp_path):
    """The rollout reads the shapes from the config, the backend from its model: one cache entry serves both."""
    model = load_model(make_context(tmp_path).model)
    assert auto_dtype.config_counts(read_config("")) == auto_dtype.linear_counts(model) == TINY


def test_config_yaml_records_what_auto_chose(tmp_path, measures):
    r = invoke("run", "--dry-run")
    assert r.exit_code == 0, r.output
    printed = yaml.safe_load(r.output[:r.output.index("dry run:")])
    assert printed["backend"]["dtype"] == printed["rollout"]["dtype"] == "bfloat16_matched"
    r = invoke("run", "--dry-run", "--set", "rollout.dtype=float32")
    printed = yaml.safe_load(r.output[:r.output.index("dry run:")])
    assert printed["backend"]["dtype"] == "float32"
    r = invoke("run", "--run-dir", tmp_path / "run", "--steps", "1", "--set", "trainer.prompts_per_step=2")
    assert r.exit_code == 0, r.output
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["backend"]["dtype"] == saved["rollout"]["dtype"] == "bfloat16_matched"


def test_plugins_set_up_without_the_cli_settle_auto_themselves(tmp_path, measures):
    ctx = attrs.evolve(make_context(tmp_path), config=PAIR)
    backend = TorchBackend(build_options(TorchBackend.Options, {}, "backend"))
    rollout = HFRollout(build_options(HFRollout.Options, {}, "rollout"))
    backend.setup(ctx=ctx)
    rollout.setup(ctx=ctx)
    assert backend.options.dtype == rollout.options.dtype == "bfloat16_matched"
    assert isinstance(backend.model.get_decoder().layers[0].mlp.down_proj, MatchedLinear)
    assert isinstance(rollout.model.get_decoder().layers[0].mlp.down_proj, MatchedLinear)
    alone = TorchBackend(build_options(TorchBackend.Options, {}, "backend"))
    alone.setup(ctx=make_context(tmp_path / "alone"))
    assert alone.options.dtype == "float32"
