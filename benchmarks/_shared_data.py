"""Where the benchmarks find their real data: the Qwen3 tokenizer ships with the tests; SmolLM2-135M-Instruct
(a 98 MB GGUF) and the full GSM8K test split do not ship, and are read from the data store next to the
checkout (`../shared/data`, see its README) unless a command-line option names another copy."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
QWEN3_TOKENIZER = REPO / "tests" / "data" / "qwen3-tokenizer"
"""The real Qwen3 tokenizer: tokenizer.json and tokenizer_config.json (tests/data/qwen3-tokenizer/SOURCE.md)."""
SMOLLM2 = SHARED / "models" / "smollm2-135m-instruct-q4_1" / "SmolLM2-135M-Instruct.Q4_1.gguf"
GSM8K_TEST = SHARED / "gsm8k" / "test.jsonl"
GSM8K_FIRST_TEST = REPO / "examples" / "data" / "gsm8k" / "test.jsonl"
"""The first 16 rows of GSM8K's test split, shipped (examples/data/SOURCE.md)."""


def require(path: Path | str, what: str, option: str) -> Path:
    """`path` if it exists; else stop the benchmark with one line naming what is missing and how to supply it."""
    path = Path(path)
    if not path.exists():
        sys.exit(f"{what} is missing: {path} does not exist (the data store ../shared/data is not part of the "
                 f"repository). Pass {option}.")
    return path


def smollm_gsm8k_batch_args(description: str, rounds: int) -> tuple[argparse.Namespace, Path, Path]:
    """The command line of a benchmark that samples a GSM8K batch with SmolLM2 (`--model`, `--gsm8k`,
    `--prompts`, `--n`, `--max-new-tokens`, `--rounds`): the arguments, the model path and the data path."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default=str(SMOLLM2), help="a GGUF file or a transformers model directory")
    parser.add_argument("--gsm8k", default=str(GSM8K_TEST), help="GSM8K's test split (jsonl)")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=rounds)
    args = parser.parse_args()
    return (args, require(args.model, "SmolLM2-135M-Instruct", "--model PATH"),
            require(args.gsm8k, "GSM8K's test split", "--gsm8k PATH"))
