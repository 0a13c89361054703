"""Data files that cannot be read end in one line naming the file, the row and the fix."""

import json

import pytest

from rlcore.errors import DataError
from rlcore_tasks.datafiles import load_split, verl_fields
from rlcore_tasks.gsm8k import GSM8K


def gsm8k(path):
    return GSM8K(GSM8K.Options(train_path=str(path), test_path=str(path)))


def test_a_file_that_is_not_utf8_names_its_row(tmp_path):
    """Before: a UnicodeDecodeError traceback from inside `datasets`."""
    path = tmp_path / "latin1.jsonl"
    good = json.dumps({"question": "1+1?", "answer": "#### 2"}).encode()
    path.write_bytes(good + b"\n" + b'{"question": "caf\xe9?", "answer": "#### 3"}\n')
    with pytest.raises(DataError, match=r"latin1.jsonl: row 1 is not valid UTF-8 \(invalid continuation byte: "
                                        r"b'\\xe9'\); re-encode the file as UTF-8"):
        gsm8k(path).dataset("train")


def test_an_empty_file_says_so(tmp_path):
    """Before: `StopIteration: `."""
    path = tmp_path / "train.jsonl"
    path.write_text("")
    with pytest.raises(DataError, match=f"data file '{path}' is empty: it holds no rows"):
        load_split("train", "", str(path))


def test_a_verl_row_without_reward_model_names_that_field(tmp_path):
    """Before: "missing field 'question'", as if it were a GSM8K row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"prompt": [[{"role": "user", "content": "2+2?"}]], "data_source": ["gsm8k"]}), path)
    with pytest.raises(DataError, match=r"train.parquet: row 0: missing field 'reward_model.ground_truth'"):
        gsm8k(path).dataset("train")


def test_verl_fields_still_reads_a_complete_row():
    row = {"prompt": [{"role": "user", "content": "q"}], "reward_model": {"ground_truth": "4"}, "extra_info": {}}
    assert verl_fields(row) == ([{"role": "user", "content": "q"}], "4", {"extra_info": {}})
