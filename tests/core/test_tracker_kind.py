"""The `tracker` plugin kind: installed trackers stay off until `trainer.log_to` names them; a selected one
gets its typed options, the run's config, every step's metrics, the generation tables and checkpoints."""

import json
from pathlib import Path

import pytest

from rlcore import plugins
from rlcore.errors import ConfigError, PluginError
from rlcore.loop import Trainer, open_registry
from rlcore.run_config import resolve

FAKE = '''
import json
from pathlib import Path
import attrs
from rlcore import hookimpl

class Fake:
    @attrs.define
    class Options:
        project: str = "p"
    def __init__(self, options):
        self.options = options
    def _write(self, *event):
        with open(self.path, "a") as f:
            f.write(json.dumps(event) + "\\n")
    @hookimpl
    def setup(self, ctx):
        self.path = Path(ctx.run_dir) / "fake_tracker.jsonl"
        self._write("setup", self.options.project, ctx.config["trainer"]["log_to"], ctx.resumed)
    @hookimpl
    def log_metrics(self, step, metrics):
        self._write("metrics", step, sorted(metrics))
    @hookimpl
    def log_generations(self, step, split, rows):
        self._write("generations", step, split, len(rows))
    @hookimpl
    def save_state(self, directory):
        self._write("save", Path(directory).name)
    @hookimpl
    def load_state(self, directory):
        self._write("load", Path(directory).name)
    @hookimpl
    def teardown(self):
        self._write("teardown")
'''

SMALL = {"trainer": {"steps": 2, "prompts_per_step": 2, "save_every": 1, "generations_every": 2,
                     "generations_samples": 3}, "sampling": {"n": 2}}


@pytest.fixture
def fake_tracker(install_fake) -> str:
    install_fake(FAKE, {"rlcore.tracker": {"fake": "{mod}:Fake"}})
    return "fake"


def test_an_installed_tracker_is_off_until_log_to_names_it(fake_tracker: str) -> None:
    assert fake_tracker in plugins.available("tracker")
    cfg = resolve({})
    assert cfg.trackers == {} and "tracker" not in cfg.to_dict()
    registry = open_registry(cfg, ("hardware",), trackers=True)
    assert not any(key.startswith("tracker:") for key in registry.keys())


def test_log_to_selects_trackers_with_typed_options_in_the_saved_config(fake_tracker: str) -> None:
    cfg = resolve({"trainer": {"log_to": "fake"}, "tracker": {"fake": {"project": "mine"}}})
    assert list(cfg.trackers) == ["fake"] and cfg.tracker_options["fake"].project == "mine"
    assert cfg.to_dict()["tracker"] == {"fake": {"project": "mine"}} and cfg.to_dict()["trainer"]["log_to"] == ["fake"]
    assert resolve(cfg.to_dict()).tracker_options["fake"].project == "mine", "config.yaml loads again on --resume"
    assert "tracker:fake" in open_registry(cfg, ("hardware",), trackers=True).keys()
    assert "tracker:fake" not in open_registry(cfg, ("hardware",)).keys(), "eval, export, convert log nothing"


def test_tracker_mistakes_name_the_fix(fake_tracker: str) -> None:
    with pytest.raises(PluginError, match=r"unknown tracker plugin 'nope'; installed tracker plugins: .*fake.*"
                                          r"List them in --set trainer.log_to=\[NAME,...\]"):
        resolve({"trainer": {"log_to": ["nope"]}})
    with pytest.raises(ConfigError, match=r"tracker.fake.projekt: unknown option; tracker.fake accepts: project"):
        resolve({"trainer": {"log_to": ["fake"]}, "tracker": {"fake": {"projekt": "x"}}})
    with pytest.raises(ConfigError, match="a tracker is listed twice"):
        resolve({"trainer": {"log_to": ["fake", "fake"]}})
    with pytest.raises(ConfigError, match="tracker: expected one mapping per tracker"):
        resolve({"tracker": {"fake": 3}})
    cfg = resolve({"tracker": {"fake": {"project": "x"}}})
    assert cfg.warnings == ["tracker.fake options ignored: 'fake' is not in trainer.log_to []"]


def test_a_run_feeds_the_tracker_and_resumes_it(fake_tracker: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cfg = resolve({**SMALL, "trainer": {**SMALL["trainer"], "log_to": ["fake"]}})
    trainer = Trainer(cfg, run_dir, progress=False)
    try:
        trainer.setup()
        trainer.run()
    finally:
        trainer.close()
    events = [json.loads(line) for line in (run_dir / "fake_tracker.jsonl").read_text().splitlines()]
    kinds = [e[0] for e in events]
    assert events[0] == ["setup", "p", ["fake"], False] and kinds[-1] == "teardown"
    metrics = [e for e in events if e[0] == "metrics"]
    assert [e[1] for e in metrics] == [1, 2] and "reward/mean" in metrics[0][2] and "step" in metrics[0][2]
    assert [e for e in events if e[0] == "generations"] == [["generations", 2, "train", 3]]
    assert [e for e in events if e[0] == "save"] == [["save", "tracker_fake"]] * 2

    resumed = Trainer(resolve({**cfg.to_dict(), "trainer": {**cfg.to_dict()["trainer"], "steps": 3}}), run_dir,
                      progress=False)
    try:
        resumed.setup(resume=True)
        resumed.run()
    finally:
        resumed.close()
    events = [json.loads(line) for line in (run_dir / "fake_tracker.jsonl").read_text().splitlines()][len(events):]
    assert events[0] == ["setup", "p", ["fake"], True] and events[1] == ["load", "tracker_fake"]
    assert [e[1] for e in events if e[0] == "metrics"] == [3]
