"""The geo3k task on 10 real Geometry3K problems with their diagrams (examples/data/geo3k): loading (its
jsonl, hiyouga/geometry3k and verl parquet rows), bad rows, scoring (accuracy + format), registration,
and a full `rlcore run` with a tiny random Qwen2.5-VL built on the real Qwen tokenizer."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from rlcore import Prompt
from rlcore.cli import main
from rlcore.config import build_options
from rlcore.errors import ConfigError, DataError
from rlcore.metrics import MetricsLog
from rlcore.plugins import available
from rlcore.testing import make_batch
from rlcore_tasks.geo3k import INSTRUCTION, TOOL_SYSTEM_PROMPT, Geo3K, to_content

REPO = Path(__file__).resolve().parents[2]
GEO = REPO / "examples" / "data" / "geo3k"
TRAIN, TEST = GEO / "train.jsonl", GEO / "test.jsonl"
"""Problems 11-18 and 19-20 of Geometry3K, images relative to GEO."""
QWEN3 = REPO / "tests" / "data" / "qwen3-tokenizer"


def task(**options: object) -> Geo3K:
    return Geo3K(build_options(Geo3K.Options, options, "task"))


def rows() -> list[dict]:
    return [json.loads(line) for path in (TRAIN, TEST) for line in path.read_text().splitlines()]


def problems(t: Geo3K) -> list[Prompt]:
    """All 10 problems: the train split, then the test split."""
    return [*t.dataset("train"), *t.dataset("test")]


def png_bytes(path: Path) -> bytes:
    return path.read_bytes()


@pytest.fixture(scope="module")
def real() -> Geo3K:
    t = task(train_path=str(TRAIN), test_path=str(TEST))
    yield t
    t.teardown()


def scores(t: Geo3K, texts: list[str], prompts: list[Prompt]) -> list[dict[str, float]]:
    batch = make_batch(groups=1, n=len(texts))
    batch.texts, batch.prompts = list(texts), list(prompts)
    out = t.score(batch)
    assert len(out.info) == len(texts) and out.rewards.shape == (len(texts),)
    return [{**info, "reward": float(r)} for info, r in zip(out.info, out.rewards)]


def answer(text: str) -> str:
    return f"<think>the diagram shows it</think> The answer is \\boxed{{{text}}}."


# ---- the real problems -------------------------------------------------------------------------------

def test_real_problems_load_with_their_diagrams(real):
    prompts, source = problems(real), rows()
    assert len(prompts) == len(source) == 10
    for p, row in zip(prompts, source):
        assert len(p.images) == 1 and p.images[0].mode == "RGB"
        assert list(p.images[0].size) == row["img_size"], "the problem's own diagram, at its size"
        with Image.open(GEO / row["image"]) as original:
            assert p.images[0].tobytes() == original.convert("RGB").tobytes()
        [message] = p.messages
        assert message["role"] == "user" and message["content"][0] == {"type": "image"}
        [text] = [c["text"] for c in message["content"] if c["type"] == "text"]
        assert row["annotat_text"] in text and text.endswith(INSTRUCTION)
        assert "Choices: " + " ".join(f"{'ABCD'[i]}. {c}" for i, c in enumerate(row["choices"])) in text
        assert p.answer == row["answer_value"] and p.meta["letter"] == row["answer"]
        assert p.meta["choices"] == row["choices"] and p.meta["id"] == row["id"]
    assert len({p.id for p in prompts}) == 10


def test_every_right_answer_scores_full_and_every_wrong_choice_scores_only_the_format(real):
    prompts = problems(real)
    for p in prompts:
        wrong = [c for c in p.meta["choices"] if c != p.answer]
        letters = [chr(65 + i) for i, c in enumerate(p.meta["choices"]) if c != p.answer]
        texts = [answer(p.answer), answer(p.meta["letter"]), answer(f"({p.meta['letter']})"),
                 answer(p.answer.replace(" ", ""))] + [answer(w) for w in wrong] + [answer(x) for x in letters]
        info = scores(real, texts, [p] * len(texts))
        assert [i["correct"] for i in info] == [1.0] * 4 + [0.0] * (len(wrong) + len(letters)), p.meta["id"]
        assert all(i["format"] == 1.0 for i in info)
        assert [i["reward"] for i in info] == pytest.approx([1.0] * 4 + [0.1] * (len(wrong) + len(letters)))


def test_values_are_checked_mathematically(real):
    by_answer = {p.answer: p for p in problems(real)}
    sqrt = by_answer["5 \\sqrt { 3 }"]
    frac = by_answer["\\frac { 2 \\sqrt { 2 } } { 5 }"]
    ten = by_answer["10"]
    cases = [(sqrt, "5\\sqrt{3}", 1.0), (sqrt, "5\\sqrt3", 1.0), (sqrt, "\\sqrt{75}", 1.0), (sqrt, "5\\sqrt{2}", 0.0),
             (frac, "\\dfrac{2\\sqrt{2}}{5}", 1.0), (frac, "\\frac{2\\sqrt2}{5}", 1.0), (frac, "0.4\\sqrt{2}", 1.0),
             (frac, "\\frac{\\sqrt{2}}{5}", 0.0), (ten, "10.0", 1.0), (ten, "$10$", 1.0), (ten, "1", 0.0)]
    info = scores(real, [answer(a) for _, a, _ in cases], [p for p, _, _ in cases])
    assert [i["correct"] for i in info] == [c for _, _, c in cases]


def test_format_needs_think_then_boxed(real):
    p = real.dataset("train")[0]
    texts = [f"<think>x</think> \\boxed{{{p.answer}}}", f"\\boxed{{{p.answer}}}",
             f"<think>x</think> {p.answer}", f"\\boxed{{{p.answer}}} <think>x</think>", "<think>x \\boxed{1}"]
    info = scores(real, texts, [p] * len(texts))
    assert [i["format"] for i in info] == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert [i["correct"] for i in info] == [1.0, 1.0, 0.0, 1.0, 0.0]
    assert [i["answered"] for i in info] == [1.0, 1.0, 0.0, 1.0, 1.0]
    assert [i["reward"] for i in info] == pytest.approx([1.0, 0.9, 0.0, 0.9, 0.0])


def test_weights_are_options():
    t = task(train_path=str(TRAIN), accuracy_weight=1.0, format_weight=0.5)
    try:
        p = t.dataset("train")[0]
        info = scores(t, [answer(p.answer), f"\\boxed{{{p.answer}}}", "<think>x</think> \\boxed{no}"], [p] * 3)
        assert [i["reward"] for i in info] == pytest.approx([1.5, 1.0, 0.5])
    finally:
        t.teardown()
    with pytest.raises(ConfigError):
        task(format_weight=-1)


def test_malformed_answers_score_zero_accuracy(real):
    p = real.dataset("train")[0]
    texts = ["<think>x</think> \\boxed{80", "<think>x</think> \\boxed{}", "", "80 80 80", "<think></think>\\boxed{E}",
             "<think></think>\\boxed{\\frac{1}{0}}", "\\boxed{80} then \\boxed{30}"]
    info = scores(real, texts, [p] * len(texts))
    assert [i["correct"] for i in info] == [0.0] * len(texts)
    assert all(i["reward"] < 0.5 for i in info)


# ---- multi-turn: verl's calc_geo3k_reward tool ---------------------------------------------------------

def test_multi_turn_offers_the_answer_check_tool():
    t = task(train_path=str(TRAIN), multi_turn=True)
    try:
        p = t.dataset("train")[0]
        assert p.messages[0] == {"role": "system", "content": TOOL_SYSTEM_PROMPT} and p.messages[1]["role"] == "user"
        [tool] = t.tools()
        assert tool.schema()["function"]["name"] == "calc_geo3k_reward"
        state = tool.create(p)
        results = [tool.execute(state, {"answer": a}) for a in ["30", "\\boxed{D}", "80", "nonsense"]]
        assert [r.text for r in results] == ["Current parsed answer='30' reward=0.0",
                                             "Current parsed answer='D' reward=1.0",
                                             "Current parsed answer='80' reward=1.0",
                                             "Current parsed answer='nonsense' reward=0.0"]
        assert [r.reward for r in results] == [-0.05, 0.0, -0.05, -0.05], "no improvement is penalised"
        # tool output in the response is not read as the answer
        text = ("<think>check</think><tool_call>{}</tool_call><tool_response>\\boxed{80}</tool_response>"
                " so \\boxed{30}")
        assert scores(t, [text], [p])[0]["correct"] == 0.0
        assert task(train_path=str(TRAIN)).tools() == []
    finally:
        t.teardown()


# ---- other row formats and bad rows -----------------------------------------------------------------

def verl_row(i: int, row: dict, image: object, content: str | None = None) -> dict:
    return {"data_source": "hiyouga/geometry3k",
            "prompt": [{"role": "user", "content": content or f"<image>{row['annotat_text']} {INSTRUCTION}"}],
            "images": [image], "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": row["answer_value"]},
            "extra_info": {"split": "train", "index": i}}


def write_parquet(path: Path, records: list[dict]) -> Path:
    import datasets

    datasets.Dataset.from_list(records).to_parquet(str(path))
    return path


def test_verl_parquet_rows_with_image_bytes(tmp_path, real):
    source = rows()[:3]
    records = [verl_row(i, r, {"bytes": png_bytes(GEO / r["image"]), "path": None}) for i, r in enumerate(source)]
    t = task(train_path=str(write_parquet(tmp_path / "train.parquet", records)))
    try:
        prompts = t.dataset("train")
        assert len(prompts) == 3
        for p, r in zip(prompts, source):
            assert p.messages[0]["content"] == [{"type": "image"},
                                                {"type": "text", "text": f"{r['annotat_text']} {INSTRUCTION}"}]
            assert list(p.images[0].size) == r["img_size"] and p.answer == r["answer_value"]
            assert p.meta["data_source"] == "hiyouga/geometry3k" and "images" not in p.meta
        info = scores(t, [answer(p.answer) for p in prompts], prompts)
        assert all(i["reward"] == 1.0 for i in info)
    finally:
        t.teardown()


def test_hiyouga_rows(tmp_path):
    source = rows()[:2]
    records = [{"images": [{"bytes": png_bytes(GEO / r["image"]), "path": None}],
                "problem": "<image>" + r["annotat_text"], "answer": r["answer_value"]} for r in source]
    t = task(train_path=str(write_parquet(tmp_path / "train.parquet", records)))
    try:
        prompts = t.dataset("train")
        assert [p.answer for p in prompts] == [r["answer_value"] for r in source]
        assert all(p.meta["choices"] is None and p.messages[0]["content"][0] == {"type": "image"} for p in prompts)
        assert "Choices" not in prompts[0].messages[0]["content"][1]["text"]
    finally:
        t.teardown()


def test_content_placeholders():
    assert to_content("a <image> b <image>", 2) == [{"type": "text", "text": "a"}, {"type": "image"},
                                                     {"type": "text", "text": " b "}, {"type": "image"}]
    assert to_content("no placeholder", 1) == [{"type": "image"}, {"type": "text", "text": "no placeholder"}]


def bad_rows_file(tmp_path: Path) -> Path:
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    good = rows()[:2]
    for r in good:
        r["image"] = str(GEO / r["image"])
    records = [good[0],
               {**good[1], "image": str(tmp_path / "missing.png")},
               {**good[1], "image": str(tmp_path / "broken.png")},
               {k: v for k, v in good[1].items() if k not in ("problem_text", "annotat_text")},
               {**good[1], "answer": "F"},
               {**good[1], "answer": None},
               good[1]]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_bad_rows_are_rejected_with_index_and_field(tmp_path):
    path = bad_rows_file(tmp_path)
    with pytest.raises(DataError, match=r"row 1: field 'images': cannot read the image"):
        task(train_path=str(path)).dataset("train")


def test_bad_rows_skip(tmp_path, caplog):
    path = bad_rows_file(tmp_path)
    t = task(train_path=str(path), bad_rows="skip")
    try:
        with caplog.at_level(logging.WARNING, logger="rlcore.tasks"):
            prompts = t.dataset("train")
        assert [p.meta["index"] for p in prompts] == [0, 6]
        warning = caplog.text
        assert "skipped 5 bad rows of 7" in warning
        assert "row 1: field 'images'" in warning and "row 2: field 'images'" in warning
        assert "row 3: missing field 'problem'" in warning and "row 4: field 'answer': letter 'F'" in warning
    finally:
        t.teardown()


def test_verl_row_with_wrong_placeholder_count_is_bad(tmp_path):
    r = rows()[0]
    image = {"bytes": png_bytes(GEO / r["image"]), "path": None}
    records = [verl_row(0, r, image, content="<image><image> two placeholders, one image")]
    with pytest.raises(DataError, match=r"row 0: .*2 '<image>' placeholders for 1 images"):
        task(train_path=str(write_parquet(tmp_path / "train.parquet", records))).dataset("train")


def test_registered_and_unknown_split():
    assert "geo3k" in available("task")
    with pytest.raises(DataError, match="no split 'val'"):
        task(train_path=str(TRAIN)).dataset("val")


# ---- a full run with a tiny Qwen2.5-VL on the real problems -------------------------------------------

@pytest.fixture(scope="module")
def tiny_vl(tmp_path_factory) -> Path:
    from rlcore.models import build_tiny_vl_model

    return build_tiny_vl_model(tmp_path_factory.mktemp("vl") / "model", seed=0, tokenizer=str(QWEN3))


@pytest.mark.slow
def test_rlcore_run_trains_a_tiny_vl_model_on_the_real_problems(tiny_vl, tmp_path):
    run = tmp_path / "run"
    args = ["run", "--task", "geo3k", "--model", str(tiny_vl), "--run-dir", str(run),
            "--set", f"task.train_path={TRAIN}", "--set", f"task.test_path={TEST}",
            "--set", "trainer.steps=2", "--set", "trainer.prompts_per_step=2", "--set", "sampling.n=3",
            "--set", "sampling.max_new_tokens=12", "--set", "backend.lr=1e-3", "--set", "trainer.save_every=0"]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    metrics = MetricsLog.read(run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert {"score/correct", "score/format", "score/answered"} <= m.keys()
        assert m["rollout/tokens"] > 0 and m["response_length/mean"] > 0
        assert m["mismatch/abs_diff_max"] < 1e-4, "trainer logprobs equal the rollout's (same weights, fp32)"
    assert (run / "checkpoints" / "step_000002").is_dir()
