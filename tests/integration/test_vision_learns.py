"""The image path learns, not only runs: `rlcore run --task colors --model embedded:qwen2.5-vl` (a random tiny
Qwen2.5-VL, images through the hf rollout and the torch backend) starts with a small, varied reward and ends well
above what any policy blind to the image can score (1/4: the prompt text is the same for every colour), over 3
seeds. The exact command and figures are in README.md ("A vision-language learning check")."""

import statistics

import pytest

from rlcore.metrics import MetricsLog

from rlcore_cli import rlcore

STEPS = 40
RECIPE = ["--task", "colors", "--model", "embedded:qwen2.5-vl", "--steps", STEPS, "--set", "backend.lr=5e-3",
          "--set", "sampling.max_new_tokens=3", "--set", "trainer.prompts_per_step=16",
          "--set", "trainer.save_every=0", "--set", "trainer.log_mismatch=false"]
BLIND = 0.25
"""The best expected reward without the image: 4 balanced colours behind the same text."""


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_vision_language_model_learns_to_read_the_colour(tmp_path, seed):
    run_dir = tmp_path / f"seed{seed}"
    rlcore("run", *RECIPE, "--seed", seed, "--run-dir", run_dir, timeout=1200)
    rows = MetricsLog.read(run_dir / "metrics.jsonl")
    rewards = [r["reward/mean"] for r in rows]
    first, last = statistics.mean(rewards[:10]), statistics.mean(rewards[-10:])
    print(f"seed {seed}: reward {first:.3f} -> {last:.3f}")
    assert 0 < first < 0.15 and any(r["reward/std"] > 0 for r in rows[:3]), "a small, varied reward at the start"
    assert last > BLIND + 0.1, f"seed {seed}: {first:.3f} -> {last:.3f} is not above what a blind policy scores"
    answered = statistics.mean(r["score/answered"] for r in rows[-10:])
    assert last / answered > BLIND + 0.1, "right more often than chance among the answers it gives"
