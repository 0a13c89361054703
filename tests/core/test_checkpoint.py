import random

import pytest
import torch

from rlcore.checkpoint import Checkpoints, rng_state, set_rng_state
from rlcore.data import PromptStream
from rlcore.testing import make_prompts


def _write(value):
    def write(d):
        (d / "x.txt").write_text(value)
    return write


def test_save_is_atomic_when_writer_dies(tmp_path):
    ck = Checkpoints(tmp_path, keep=2)
    ck.save(1, _write("one"))

    def broken(d):
        (d / "partial.txt").write_text("half")
        raise KeyboardInterrupt  # a kill in the middle of writing

    with pytest.raises(KeyboardInterrupt):
        ck.save(2, broken)
    assert ck.latest().name == "step_000001" and (ck.latest() / "x.txt").read_text() == "one"
    ck.save(3, _write("three"))  # the stale temporary directory is cleaned up
    assert not list(tmp_path.glob(".tmp-*"))
    assert [p.name for p in ck.all()] == ["step_000001", "step_000003"]


def test_keeps_only_newest(tmp_path):
    ck = Checkpoints(tmp_path, keep=2)
    for s in (1, 2, 3, 10):
        ck.save(s, _write(str(s)))
    assert [p.name for p in ck.all()] == ["step_000003", "step_000010"]


def test_rng_state_roundtrip():
    state = rng_state()
    a = (random.random(), torch.rand(3))
    set_rng_state(state)
    b = (random.random(), torch.rand(3))
    assert a[0] == b[0] and torch.equal(a[1], b[1])


def test_prompt_stream_resumes_exactly():
    data = make_prompts(7)
    s = PromptStream(data, seed=3)
    s.take(5)
    state = s.state()
    rest = [p.id for p in s.take(12)]
    t = PromptStream(data, seed=3)
    t.load(state)
    assert [p.id for p in t.take(12)] == rest
    # every epoch is a permutation of the whole dataset
    u = PromptStream(data, seed=3)
    assert sorted(p.id for p in u.take(7)) == sorted(p.id for p in data)
