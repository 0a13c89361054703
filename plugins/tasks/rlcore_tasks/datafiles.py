"""Loading a task's rows through `datasets` (a local jsonl / json / parquet file, a local directory whose
file names give the splits, or a hub id where a network exists) and turning them into Prompts, with every
bad row reported by index and either skipped or rejected.

Rows in verl's format (`prompt` as chat messages, `reward_model.ground_truth`, `extra_info`) are read
by `verl_fields`, so parquet files prepared for verl work unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from rlcore import Prompt
from rlcore.errors import DataError

log = logging.getLogger("rlcore.tasks")

BUILDERS = {".jsonl": "json", ".json": "json", ".jsonl.gz": "json", ".json.gz": "json", ".parquet": "parquet"}
BAD_ROWS = ("skip", "error")
SHOWN_SKIPS = 5
"""Skipped rows named one by one in the warning; the rest are only counted."""


class BadRow(ValueError):
    """Raised by a row converter: the message names the missing or malformed field."""


def field(row: Mapping[str, Any], *path: str) -> Any:
    """`row[path[0]][path[1]]...`; BadRow naming the dotted field when it is absent, null or empty."""
    value: Any = row
    for key in path:
        value = value.get(key) if isinstance(value, Mapping) else None
        if value is None or value == "":
            raise BadRow(f"missing field '{'.'.join(path)}'")
    return value


def is_verl_row(row: Mapping[str, Any]) -> bool:
    """Whether a row is in verl's format: chat-message `prompt` plus `reward_model` (a list `prompt` without
    `reward_model` counts too, so its error names the missing `reward_model.ground_truth`)."""
    prompt = row.get("prompt")
    return isinstance(prompt, list) or (prompt is not None and row.get("reward_model") is not None)


def verl_fields(row: Mapping[str, Any]) -> tuple[list[dict[str, Any]], str, dict[str, Any]]:
    """A verl row's chat messages, ground truth and the rest of the row (`data_source`, `extra_info`, ...)."""
    messages = field(row, "prompt")
    if not isinstance(messages, list) or not all(
            isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise BadRow("field 'prompt' must be a list of chat messages with string 'role' and 'content'")
    truth = field(row, "reward_model", "ground_truth")
    rest = {k: v for k, v in row.items() if k not in ("prompt", "reward_model")}
    return [{"role": m["role"], "content": m["content"]} for m in messages], str(truth), rest


def is_local(path: str) -> bool:
    """Whether `path` names a local file or directory (rather than a hub id)."""
    return Path(path).expanduser().exists() or path.startswith(("/", "./", "../", "~")) or any(
        path.endswith(suffix) for suffix in BUILDERS)


def load_split(split: str, path: str, split_path: str = "", subset: str = "") -> tuple[Any, str]:
    """The rows of `split` through `datasets`, and the files (or hub id) they came from, for messages.

    `split_path`, when given, holds this split alone: a local file (all its rows), a directory or a hub
    id. Otherwise `path` holds both splits: a local directory (the split from its file names, e.g.
    train.parquet / test.jsonl) or a hub id (`subset` is its config name).
    """
    import datasets

    name = split_path or path
    local = Path(name).expanduser()
    if is_local(name) and not local.exists():
        raise DataError(f"data path {name!r} does not exist")
    if local.is_file() and not split_path:
        raise DataError(f"{name!r} is a single file, which cannot hold both splits: give a directory holding "
                        f"train and test files, or give the file as task.{split}_path")
    suffix = next((s for s in BUILDERS if local.name.endswith(s)), None)
    if local.is_file() and suffix is None:
        raise DataError(f"data file {name!r}: unknown type; use .jsonl, .json or .parquet")
    if local.is_file() and local.stat().st_size == 0:
        raise DataError(f"data file {name!r} is empty: it holds no rows; point the task at a file with rows")
    try:
        if local.is_file():
            return datasets.load_dataset(BUILDERS[suffix], data_files=str(local), split="train"), str(local)
        if local.is_dir():
            files = datasets.load_dataset_builder(str(local)).config.data_files
            if split not in files:
                raise DataError(f"{name} holds no {split} files (found: {', '.join(map(str, files)) or 'none'}); "
                                f"name them like {split}.jsonl or {split}.parquet, or set task.{split}_path")
            more = len(files[split]) - 3
            shown = ", ".join(files[split][:3]) + (f" and {more} more" if more > 0 else "")
            return datasets.load_dataset(str(local), split=split), shown
        return datasets.load_dataset(name, subset or None, split=split), f"{name} ({split} split)"
    except DataError:
        raise
    except StopIteration:  # datasets' json reader on a file without a single row
        raise DataError(f"data file {name!r} holds no rows; point the task at a file with rows") from None
    except Exception as e:  # noqa: BLE001 - datasets raises many types; all mean the data cannot be read
        hint = "" if local.exists() else (" (a hub id needs a network: set task.path to a local directory, or "
                                          "task.train_path / task.test_path to local files)")
        raise DataError(f"cannot load {name} ({split} split) through datasets: {type(e).__name__}: {e}{hint}") from e


def to_prompts(rows: Iterable[Mapping[str, Any]], convert: Callable[[Mapping[str, Any], int], Prompt],
               source: str, bad_rows: str) -> list[Prompt]:
    """`convert(row, index)` for every row. A row it rejects with BadRow raises DataError naming the
    source, the row index (from 0) and the field when `bad_rows` is "error"; with "skip" it is left out
    and reported in one warning."""
    prompts: list[Prompt] = []
    skipped: list[str] = []
    for i, row in enumerate(_decoded(rows, source)):
        try:
            prompts.append(convert(row, i))
        except BadRow as e:
            if bad_rows == "error":
                raise DataError(f"{source}: row {i}: {e} (--set task.bad_rows=skip skips bad rows)") from None
            skipped.append(f"row {i}: {e}")
    if skipped:
        more = f"; and {len(skipped) - SHOWN_SKIPS} more" if len(skipped) > SHOWN_SKIPS else ""
        log.warning("%s: skipped %d bad rows of %d: %s%s", source, len(skipped), len(skipped) + len(prompts),
                    "; ".join(skipped[:SHOWN_SKIPS]), more)
    if not prompts:
        raise DataError(f"{source}: no usable rows")
    return prompts


def _decoded(rows: Iterable[Mapping[str, Any]], source: str) -> Iterable[Mapping[str, Any]]:
    """`rows`, with text that is not UTF-8 (which `datasets` decodes only as rows are read) reported by row."""
    it = iter(rows)
    index = 0
    while True:
        try:
            row = next(it)
        except StopIteration:
            return
        except UnicodeDecodeError as e:
            raise DataError(f"{source}: row {index} is not valid UTF-8 ({e.reason}: "
                            f"{e.object[e.start:e.start + 1]!r}); re-encode the file as UTF-8 "
                            "(e.g. iconv -f latin1 -t utf-8)") from None
        yield row
        index += 1
