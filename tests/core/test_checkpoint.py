import json
import random
import shutil

import pytest
import torch

from rlcore.checkpoint import MANIFEST, Checkpoints, rng_state, set_rng_state, verify
from rlcore.errors import DiskError
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
    newest, _ = ck.newest_complete()
    assert newest.name == "step_000001" and (newest / "x.txt").read_text() == "one"
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


def _stateful(d):
    (d / "backend").mkdir()
    (d / "backend" / "weights.bin").write_bytes(bytes(range(256)) * 64)
    (d / "core").mkdir()
    (d / "core" / "trainer_state.json").write_text('{"step": 1}')
    return ["backend", "core"]


def test_manifest_is_written_last_and_a_sound_checkpoint_verifies(tmp_path):
    ck = Checkpoints(tmp_path)
    path = ck.save(1, _stateful)
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["state"] == ["backend", "core"] and manifest["step"] == 1
    assert manifest["files"]["backend/weights.bin"]["size"] == 256 * 64
    newest = max(path.rglob("*"), key=lambda p: p.stat().st_mtime_ns)
    assert newest.name == MANIFEST  # sealed after every file was written
    assert verify(path, ["backend", "core"]) is None


@pytest.mark.parametrize("damage,reason", [
    (lambda p: (p / "backend" / "weights.bin").write_bytes(b"\0" * 100), "has 100 bytes, 16384 were written"),
    (lambda p: (p / "core" / "trainer_state.json").write_text(""), "core/trainer_state.json has 0 bytes"),
    (lambda p: (p / "core" / "trainer_state.json").unlink(), "core/trainer_state.json is missing"),
    (lambda p: shutil.rmtree(p / "backend"), "backend/weights.bin is missing"),
    (lambda p: (p / MANIFEST).unlink(), f"no {MANIFEST}"),
    (lambda p: (p / MANIFEST).write_text("{"), "is unreadable"),
    (lambda p: _flip_a_byte(p / "backend" / "weights.bin"), "is corrupt"),
])
def test_a_damaged_checkpoint_is_incomplete_and_resume_takes_the_previous_one(tmp_path, damage, reason):
    ck = Checkpoints(tmp_path, keep=3)
    first, second = ck.save(1, _stateful), ck.save(2, _stateful)
    damage(second)
    assert reason in verify(second, ["backend", "core"])
    chosen, skipped = ck.newest_complete(["backend", "core"])
    assert chosen == first and [(p, reason in why) for p, why in skipped] == [(second, True)]


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[1000] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_checkpoint_without_a_plugins_state_is_incomplete(tmp_path):
    """A checkpoint saved without `backend/` (that plugin saved nothing) never counts for a run whose backend
    saves state, so it cannot be resumed with fresh weights."""
    ck = Checkpoints(tmp_path)

    def core_only(d):
        (d / "core").mkdir()
        (d / "core" / "trainer_state.json").write_text("{}")
        return ["core"]

    path = ck.save(10, core_only)
    assert "no backend/ state" in verify(path, ["backend", "core"])
    assert ck.newest_complete(["backend", "core"])[0] is None


def test_a_failed_save_leaves_no_temporary_directory(tmp_path):
    ck = Checkpoints(tmp_path)

    def broken(d):
        (d / "part").write_text("x")
        raise ValueError("a plugin failed")

    with pytest.raises(ValueError):
        ck.save(1, broken)
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_is_one_line_naming_the_checkpoint_and_the_fix(tmp_path):
    """/dev/full answers every write with ENOSPC, as a full disk does."""
    ck = Checkpoints(tmp_path)
    ck.save(1, _stateful)

    def to_full_disk(d):
        (d / "x").symlink_to("/dev/full")
        with open(d / "x", "w") as f:
            f.write("x" * 100_000)

    with pytest.raises(DiskError) as e:
        ck.save(2, to_full_disk)
    message = str(e.value)
    assert message.startswith(f"no space left on device: {tmp_path}") and "step 2" in message
    assert "step_000001 is intact" in message and "free space" in message
    assert [p.name for p in tmp_path.iterdir()] == ["step_000001"]


def test_torchs_writer_on_a_full_disk_is_recognised(tmp_path, monkeypatch):
    """torch.save reports a full disk as `RuntimeError: ... unexpected pos`, without an errno: the free space
    at the moment of the failure tells."""
    ck = Checkpoints(tmp_path)

    def torch_writer(d):
        (d / "trainer.pt").symlink_to("/dev/full")  # a writer that replaced its file would replace only the link
        torch.save({"w": torch.zeros(1000)}, d / "trainer.pt")

    monkeypatch.setattr(shutil, "disk_usage", lambda _p: shutil._ntuple_diskusage(10**9, 10**9, 0))
    with pytest.raises(DiskError, match="no space left on device"):
        ck.save(1, torch_writer)
    assert list(tmp_path.iterdir()) == []
