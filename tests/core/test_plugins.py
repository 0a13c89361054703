import pytest

from rlcore import plugins
from rlcore.errors import PluginError
from rlcore.hookspecs import all_hook_names

GOOD = '''
import attrs
from rlcore import hookimpl, Scores, Prompt
import torch

class Echo:
    @attrs.define
    class Options:
        size: int = 3
    def __init__(self, options):
        self.options = options
    @hookimpl
    def dataset(self, split):
        return [Prompt(messages=[{"role": "user", "content": "1="}], answer="1")] * self.options.size
'''


def test_builtin_plugins_are_entry_points():
    assert "grpo" in plugins.available("algo")
    assert {"cpu", "cuda"} <= set(plugins.available("hardware"))
    assert plugins.entry_points("task")["arithmetic"].dist.name == "rlcore-tasks"


def test_unknown_name_lists_installed():
    with pytest.raises(PluginError) as e:
        plugins.load("algo", "nope")
    msg = str(e.value)
    assert "unknown algo plugin 'nope'" in msg and "grpo" in msg and "--algo" in msg


def test_unknown_kind():
    with pytest.raises(PluginError, match="kinds are"):
        plugins.entry_points("engine")


def test_third_party_plugin_loads_with_options(install_fake):
    mod = install_fake(GOOD, {"rlcore.task": {"echo_fake": "{mod}:Echo"}})
    cls = plugins.load("task", "echo_fake")
    inst = plugins.instantiate(cls, {"size": "5"}, "task")
    assert len(inst.dataset("train")) == 5
    info = [p for p in plugins.describe_all() if p.name == "echo_fake"][0]
    assert (info.kind, info.distribution, info.version, info.error) == ("task", mod, "0.3", None)


def test_broken_plugin_reported_by_name_and_harmless(install_fake):
    install_fake("raise ImportError('missing dependency libfoo')\n", {"rlcore.algo": {"broken": "{mod}:X"}})
    with pytest.raises(PluginError) as e:
        plugins.load("algo", "broken")
    assert "algo plugin 'broken'" in str(e.value) and "libfoo" in str(e.value)
    assert plugins.load("algo", "grpo") is not None  # the unrelated plugin still loads
    info = {p.name: p for p in plugins.describe_all()}
    assert "libfoo" in info["broken"].error and info["grpo"].error is None


def test_disable_env(monkeypatch):
    monkeypatch.setenv(plugins.DISABLE_ENV, "cuda, algo:grpo")
    assert "cuda" not in plugins.available("hardware")
    assert "grpo" not in plugins.available("algo")
    with pytest.raises(PluginError, match="disabled by RLCORE_DISABLE_PLUGINS"):
        plugins.load("algo", "grpo")


def test_registry_rejects_misspelled_hook():
    class Typo:
        from rlcore import hookimpl

        @hookimpl
        def advantages(self, batch):  # the hook is `advantage`
            return None

    reg = plugins.Registry()
    with pytest.raises(PluginError, match=r"^algo plugin 'typo' implements 'advantages', which is not an rlcore hook; "
                                          r"did you mean `advantage`\?$"):
        reg.register("algo", "typo", Typo())


def test_registry_call_targets_one_plugin(tmp_path):
    from rlcore import hookimpl

    seen = []

    class A:
        @hookimpl
        def save_state(self, directory):
            seen.append(("a", directory))

    class B:
        @hookimpl
        def save_state(self, directory):
            seen.append(("b", directory))

    reg = plugins.Registry()
    reg.register("algo", "a", A())
    reg.register("task", "b", B())
    reg.call("task", "save_state", directory=tmp_path)
    assert seen == [("b", tmp_path)]
    assert reg.implements("algo", "save_state") and not reg.implements("algo", "advantage")


def test_contract_names_cover_the_loop():
    names = set(all_hook_names())
    assert {"sample", "score", "advantage", "update", "sync_weights", "policy_loss", "dataset", "keep_groups",
            "logprobs", "policy_weights", "setup", "teardown", "save_state", "load_state", "device"} <= names
