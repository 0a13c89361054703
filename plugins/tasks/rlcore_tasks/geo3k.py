"""Geometry3K: multiple-choice geometry problems with a diagram, for vision-language models (Qwen2.5-VL).

Each prompt carries its diagram in `Prompt.images` and chat messages in the Qwen2.5-VL content format
(`[{"type": "image"}, {"type": "text", "text": ...}]`); the rollout's processor turns them into image
tokens and pixel values. The reward is verl's geo3k reward: `accuracy_weight` x (the last `\\boxed{}`
answer is right) + `format_weight` x (the response is `<think>...</think>` followed by a `\\boxed{}` answer).

Rows, told apart per row:
- Inter-GPS / Geometry3K rows (`problem_text` or `annotat_text`, `choices`, `answer` letter, and an `image`
  path relative to the data file's directory or `task.image_root`), e.g. `examples/data/geo3k`;
- `hiyouga/geometry3k` rows (`problem` with an `<image>` placeholder, `answer` value, `images`);
- verl's parquet rows (`prompt` chat messages with `<image>` placeholders, `images`, `reward_model.ground_truth`).
Images may be PIL images, `{"bytes": ...}` / `{"path": ...}` mappings (parquet), raw bytes or paths.
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import attrs

from rlcore import Prompt, RolloutBatch, Scores, Tool, hookimpl
from rlcore.config import check_choice, check_range
from rlcore.errors import DataError
from rlcore.scoring import score_each
from rlcore_tasks.answers import last_boxed, without_tool_responses
from rlcore_tasks.datafiles import BAD_ROWS, BadRow, field, is_verl_row, load_split, to_prompts, verl_fields
from rlcore_tasks.equivalence import Checker, CheckTimeout
from rlcore_tasks.images import needs_vision_model
from rlcore_tasks.tools import AnswerCheckTool

SPLITS = ("train", "test")
INSTRUCTION = (
    "You FIRST think about the reasoning process as an internal monologue and then provide the final answer. "
    "The reasoning process MUST BE enclosed within <think> </think> tags. The final answer MUST BE put in \\boxed{}.")
"""verl's geo3k instruction (examples/data_preprocess/geo3k.py), appended to each problem."""
FORMAT = re.compile(r"\s*<think>.*</think>.*\\boxed\{.*\}.*", re.DOTALL)
"""verl's geo3k format check: reasoning in `<think>` tags, then a boxed answer."""
TOOL_SYSTEM_PROMPT = (
    "You are a math expert. You are given a question and you need to solve it step by step. "
    "Reason step by step before any tool call. You should use the `calc_geo3k_reward` tool after solving the "
    "question step by step, before giving the final answer, at least once, and refine your answer if necessary.")
"""The system prompt of verl's geo3k multi-turn recipe (examples/data_preprocess/geo3k_multiturn_w_tool.py)."""
PLACEHOLDER = "<image>"
CHOICE = re.compile(r"\(?([A-Z])\)?(?:[.:)]\s*(.*))?", re.DOTALL)
"""A choice letter as an answer: `B`, `(B)`, `B.`, `B. 13`."""


def _open_image(image: Any, base: Path | None) -> Any:
    """A loaded RGB PIL image; BadRow when it cannot be read."""
    from PIL import Image

    try:
        if isinstance(image, Mapping):
            image = image.get("bytes") or image.get("path")
        if isinstance(image, (bytes, bytearray)):
            image = Image.open(io.BytesIO(image))
        elif isinstance(image, (str, Path)):
            path = Path(image)
            if not path.is_absolute() and base is not None and (base / path).exists():
                path = base / path
            image = Image.open(path)
        if not isinstance(image, Image.Image):
            raise BadRow(f"field 'images': {type(image).__name__} is not an image")
        image.load()
        return image.convert("RGB")
    except BadRow:
        raise
    except Exception as e:  # noqa: BLE001 - PIL raises many types; all mean the image is unreadable
        raise BadRow(f"field 'images': cannot read the image ({type(e).__name__}: {e})") from None


def to_content(text: str, images: int) -> list[dict[str, Any]]:
    """`text` in the Qwen2.5-VL content format: each `<image>` becomes an image entry; with no placeholder,
    the images come first."""
    parts = text.split(PLACEHOLDER)
    if len(parts) == 1:
        return [{"type": "image"} for _ in range(images)] + [{"type": "text", "text": text}]
    if len(parts) - 1 != images:
        raise BadRow(f"{len(parts) - 1} '<image>' placeholders for {images} images")
    content: list[dict[str, Any]] = []
    for i, part in enumerate(parts):
        if i:
            content.append({"type": "image"})
        if part.strip():
            content.append({"type": "text", "text": part.strip() if i == 0 else part})
    return content


def normalize(answer: str) -> str:
    """An answer as text compared exactly: without spaces, `$`, `\\left` / `\\right` and a final period
    (`5 \\sqrt { 3 }` -> `5\\sqrt{3}`)."""
    text = re.sub(r"\\(?:left|right)(?![A-Za-z])|\\[!,;:]", "", answer)
    return re.sub(r"[\s$]", "", text).rstrip(".").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")


def _number(text: str) -> Fraction | None:
    try:
        return Fraction(normalize(text))
    except (ValueError, ZeroDivisionError):
        return None


class Geo3K:
    """Geometry3K with diagrams: `dataset` reads and checks the split's rows (images loaded), `score` grades
    the boxed answer (choice letter or value) and the `<think>` + `\\boxed{}` format."""

    @attrs.define
    class Options:
        path: str = "hiyouga/geometry3k"
        """Where both splits are: a local directory (train / test files, jsonl or parquet) or a hub id."""
        subset: str = ""
        """The hub dataset's config name, if it has several; ignored for local files."""
        train_path: str = ""
        """A jsonl / parquet file (or directory, or hub id) holding the train split alone; overrides `path`."""
        test_path: str = ""
        """The same for the test split."""
        image_root: str = ""
        """Directory that relative image paths are read from; default: the data file's directory."""
        show_choices: bool = True
        """Rows with `choices` list them in the prompt (`Choices: A. 30 B. 40 ...`), so a letter answers too."""
        accuracy_weight: float = attrs.field(default=0.9, validator=check_range(0.0))
        """Reward for a right answer (verl's geo3k: 1 - format_score = 0.9)."""
        format_weight: float = attrs.field(default=0.1, validator=check_range(0.0))
        """Reward for the format: `<think>...</think>` then a `\\boxed{}` answer (verl's format_score 0.1)."""
        timeout_s: float = attrs.field(default=5.0, validator=check_range(0.01))
        """Seconds math-verify may spend on one answer that is not plainly equal to the reference."""
        multi_turn: bool = False
        """verl's geo3k multi-turn recipe: a system prompt tells the model to check its answer with the
        `calc_geo3k_reward` tool, which the task offers through its `tools` hook."""
        bad_rows: str = attrs.field(default="error", validator=check_choice(*BAD_ROWS))
        """A row with a missing field, a wrong answer letter or an unreadable image: `error` stops with its
        file, index and field; `skip` leaves it out with a warning naming it."""

    def __init__(self, options: Options) -> None:
        self.options = options
        self.checker = Checker(options.timeout_s)

    @hookimpl
    def modalities(self) -> list[str]:
        """Every prompt carries its diagram."""
        return ["image"]

    @hookimpl
    def check_run(self, model_config: Any) -> list[str]:
        """Refuse a text-only model: it cannot read the diagrams."""
        return needs_vision_model("geo3k", model_config)

    @hookimpl
    def dataset(self, split: str) -> Sequence[Prompt]:
        """The split's problems, loaded through `datasets`, each with its diagram(s) read and checked."""
        if split not in SPLITS:
            raise DataError(f"geo3k has no split {split!r}; splits: {', '.join(SPLITS)}")
        o = self.options
        split_path = o.train_path if split == "train" else o.test_path
        rows, source = load_split(split, o.path, split_path, o.subset)
        base = Path(o.image_root).expanduser() if o.image_root else None
        if base is None and Path(split_path or o.path).expanduser().exists():
            local = Path(split_path or o.path).expanduser()
            base = local if local.is_dir() else local.parent
        return to_prompts(rows, lambda row, i: self.prompt(row, f"{split}-{i}", i, base), source, o.bad_rows)

    def prompt(self, row: Mapping[str, Any], prompt_id: str, index: int, base: Path | None = None) -> Prompt:
        """One row as a Prompt with its images; `answer` is the reference value (`choices[letter]` for
        Geometry3K rows) and `meta` keeps the choices and the answer letter when the row has them."""
        if is_verl_row(row):
            messages, truth, rest = verl_fields(row)
            images = [_open_image(i, base) for i in self._images(row)]
            count = sum(m["content"].count(PLACEHOLDER) for m in messages)
            if count not in (0, len(images)) or (count == 0 and images and len(messages) != 1):
                raise BadRow(f"field 'prompt': {count} '<image>' placeholders for {len(images)} images")
            converted = [{"role": m["role"], "content": to_content(m["content"], len(images) if count == 0 else
                                                                    m["content"].count(PLACEHOLDER))}
                         for m in messages]
            rest.pop("images", None)
            return Prompt(messages=converted, answer=truth, id=prompt_id, images=images or None,
                          meta={"index": index, **rest})
        problem = row.get("problem") or row.get("annotat_text") or row.get("problem_text")
        if not problem:
            raise BadRow("missing field 'problem' (or 'annotat_text' / 'problem_text')")
        answer, choices = str(field(row, "answer")).strip(), row.get("choices") or None
        letter = None
        if choices:
            choices = [str(c) for c in choices]
            if len(answer) == 1 and answer.isalpha():
                letter = answer.upper()
                if not 0 <= ord(letter) - 65 < len(choices):
                    raise BadRow(f"field 'answer': letter {answer!r} names no choice of {len(choices)}")
                answer = str(row.get("answer_value") or choices[ord(letter) - 65])
            elif answer in choices:
                letter = chr(65 + choices.index(answer))
        images = [_open_image(i, base) for i in self._images(row)]
        if not images:
            raise BadRow("missing field 'images' (or 'image')")
        text = str(problem).replace(PLACEHOLDER, "").strip()
        if choices and self.options.show_choices:
            text += " Choices: " + " ".join(f"{chr(65 + i)}. {c}" for i, c in enumerate(choices)) + "."
        content = to_content(f"{PLACEHOLDER}{text} {INSTRUCTION}", 1) if len(images) == 1 else \
            to_content(f"{text} {INSTRUCTION}", len(images))
        meta = {"index": index, "choices": choices, "letter": letter,
                **{k: v for k, v in row.items() if k in ("id", "problem_type_graph", "problem_type_goal")}}
        messages = [{"role": "user", "content": content}]
        if self.options.multi_turn:
            messages.insert(0, {"role": "system", "content": TOOL_SYSTEM_PROMPT})
        return Prompt(messages=messages, answer=answer, id=prompt_id, images=images, meta=meta)

    @staticmethod
    def _images(row: Mapping[str, Any]) -> list[Any]:
        images = row.get("images")
        if images is None and row.get("image") is not None:
            images = [row["image"]]
        if images is None:
            return []
        return list(images) if isinstance(images, (list, tuple)) else [images]

    @hookimpl
    def tools(self) -> list[Tool]:
        """The answer check in multi-turn mode, else none."""
        return [Geo3KAnswerCheck(self.correct)] if self.options.multi_turn else []

    @hookimpl
    def score(self, batch: RolloutBatch) -> Scores:
        """reward = accuracy_weight x correct + format_weight x format; info has `correct`, `format`,
        `answered` (a `\\boxed{}` answer was found) and `timeout` (math-verify ran out of time)."""
        return score_each(batch, self.reward)

    def reward(self, text: str, prompt: Prompt) -> dict[str, float]:
        """One response's reward."""
        o = self.options
        if o.multi_turn:
            text = without_tool_responses(text)
        fmt = float(FORMAT.fullmatch(text) is not None)
        answer = last_boxed(text)
        timeout = 0.0
        correct = 0.0
        if answer is not None:
            try:
                correct = float(self.correct(answer, prompt))
            except CheckTimeout:
                timeout = 1.0
        return {"reward": o.accuracy_weight * correct + o.format_weight * fmt, "correct": correct, "format": fmt,
                "answered": float(answer is not None), "timeout": timeout}

    def correct(self, answer: str, prompt: Prompt) -> bool:
        """Whether `answer` is the reference: its choice letter (when the problem has choices), the same
        text or number, or mathematically equal (math-verify, e.g. `5\\sqrt{3}` = `5 \\sqrt { 3 }`)."""
        gold = str(prompt.answer)
        choices, letter = prompt.meta.get("choices"), prompt.meta.get("letter")
        picked = CHOICE.fullmatch(answer.strip())
        if choices and letter and picked and ord(picked.group(1)) - 65 < len(choices):
            return picked.group(1) == letter
        if normalize(answer) == normalize(gold):
            return True
        a, g = _number(answer), _number(gold)
        if a is not None and g is not None:
            return a == g
        return self.checker(gold, answer)

    @hookimpl
    def teardown(self) -> None:
        """Stop the math-verify worker."""
        self.checker.close()


class Geo3KAnswerCheck(AnswerCheckTool):
    """verl's `calc_geo3k_reward`: grades a submitted answer (the contents of its last `\\boxed{}`, or the
    whole text) like the task's accuracy."""

    name = "calc_geo3k_reward"
    description = ("Check your answer to the geometry problem: returns the parsed answer and its reward, 1.0 when "
                   "correct and 0.0 otherwise.")
    parameters = {
        "type": "object",
        "properties": {"answer": {"type": "string", "description": "The answer to the problem, e.g. a choice "
                                                                   "letter or a value"}},
        "required": ["answer"],
    }

    def __init__(self, correct: Any) -> None:
        self._correct = correct

    def grade(self, answer: str, prompt: Prompt) -> tuple[str, float]:
        """The last `\\boxed{}` answer (or the whole text), graded as the task grades; 0.0 on a checker timeout."""
        answer = answer.strip()
        parsed = last_boxed(answer) or answer
        try:
            return parsed, float(bool(parsed) and self._correct(parsed, prompt))
        except CheckTimeout:
            return parsed, 0.0
