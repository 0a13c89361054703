import pickle

import pytest
import torch

from rlcore.errors import DataError
from rlcore.testing import make_batch
from rlcore.types import RolloutBatch


def test_select_keeps_rows_aligned():
    b = make_batch(groups=3, n=2, seed=0)
    sub = b.select([5, 0])
    assert torch.equal(sub.response_ids, b.response_ids[[5, 0]])
    assert sub.texts == [b.texts[5], b.texts[0]] and sub.prompts == [b.prompts[5], b.prompts[0]]
    assert torch.equal(sub.group_ids, torch.tensor([2, 0]))
    assert sub.temperature == b.temperature


def test_split_covers_batch_in_order():
    b = make_batch(groups=3, n=3, seed=1)
    parts = b.split(4)
    assert [len(p) for p in parts] == [4, 4, 1]
    assert torch.equal(torch.cat([p.response_ids for p in parts]), b.response_ids)


def test_sequences_put_response_after_prompt():
    b = make_batch(groups=1, n=2, prompt_len=3, response_len=4, seed=2)
    ids, mask = b.sequences()
    assert ids.shape == (2, 7) and torch.equal(ids[:, 3:], b.response_ids)
    assert torch.equal(mask[:, :3], b.prompt_mask) and torch.equal(mask[:, 3:], b.attention_mask)


def test_concat_repads_and_renumbers_groups():
    a = make_batch(groups=2, n=2, prompt_len=3, response_len=4, seed=3)
    c = make_batch(groups=1, n=2, prompt_len=5, response_len=2, seed=4)
    j = RolloutBatch.concat([a, c], pad_id=0)
    j.validate()
    assert j.prompt_ids.shape == (6, 5) and j.response_ids.shape == (6, 4)
    assert torch.equal(j.prompt_ids[:4, 2:], a.prompt_ids) and (j.prompt_ids[:4, :2] == 0).all()
    assert torch.equal(j.response_ids[4:, :2], c.response_ids) and (j.response_mask[4:, 2:] == 0).all()
    assert j.group_ids.tolist() == [0, 0, 1, 1, 2, 2]
    assert j.texts == a.texts + c.texts


def test_batch_pickles_for_other_processes():
    b = make_batch(groups=2, n=2, seed=5, with_advantages=True)
    back = pickle.loads(pickle.dumps(b))
    assert torch.equal(back.advantages, b.advantages) and back.prompts == b.prompts


def test_validate_names_the_problem():
    b = make_batch(groups=1, n=2, seed=6)
    b.texts = b.texts[:1]
    with pytest.raises(DataError, match="texts"):
        b.validate()
    b = make_batch(groups=1, n=2, seed=6)
    b.rollout_logprobs[0, 0] = float("nan")
    with pytest.raises(DataError, match="NaN"):
        b.validate()


def test_multimodal_inputs_follow_their_samples():
    """Per-sample vision inputs stay with their sample through select, split, concat and pickling."""
    b = make_batch(groups=2, n=2, seed=7)
    b.multimodal = [{"pixel_values": torch.full((i + 1, 3), float(i)), "image_grid_thw": torch.tensor([[1, 2, i + 2]])}
                    for i in range(len(b))]
    b.validate()
    assert [int(m["pixel_values"][0, 0]) for m in b.select([3, 1]).multimodal] == [3, 1]
    assert [[int(m["pixel_values"][0, 0]) for m in p.multimodal] for p in b.split(3)] == [[0, 1, 2], [3]]
    text_only = make_batch(groups=1, n=2, seed=8)
    j = RolloutBatch.concat([b, text_only])
    j.validate()
    assert len(j.multimodal) == 6 and j.multimodal[4:] == [{}, {}]
    assert torch.equal(pickle.loads(pickle.dumps(j)).multimodal[2]["pixel_values"], b.multimodal[2]["pixel_values"])
    b.multimodal = b.multimodal[:3]
    with pytest.raises(DataError, match="multimodal"):
        b.validate()
