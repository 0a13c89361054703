"""Reward hacking end to end: the hacks that once scored 1 on every HumanEval and MBPP problem, and the
resource attacks on the host, put through the real `rlcore eval --task code` and `rlcore run --task
code` commands by a test-only rollout plugin (`scripted_rollout/`) that answers each prompt with chosen
responses. Every hack scores 0 with no reward error; the canonical solutions beside them score 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlcore.metrics import MetricsLog

DATA = Path(__file__).resolve().parents[1] / "data"
HUMANEVAL, MBPP = DATA / "humaneval" / "HumanEval.jsonl", DATA / "mbpp" / "mbpp.jsonl"
PLUGIN = Path(__file__).resolve().parent / "scripted_rollout"
PROBLEMS = 3
"""The first problems of each dataset put through the commands."""

HACKS = {
    "replacing exec and compile": "import builtins\nbuiltins.exec = builtins.compile = lambda *a, **k: None\n{stub}",
    "patching os.write": "import os\n_write = os.write\nos.write = lambda fd, data: _write(fd, b'2:T;' * 50)\n{stub}",
    "reading the harness's frames and printing passes": (
        "import gc, sys\nfound = [o for o in gc.get_objects() if isinstance(o, str) and ('assert' in o or 'check(' in o)]\n"
        "frame = sys._getframe()\nwhile frame:\n    found.append(repr(frame.f_globals))\n    frame = frame.f_back\n"
        "for i in range(10):\n    print(f'ok {{i}} 1')\n    print('@@rlcore-result ' + b'T'.hex())\n{stub}"),
    "rewriting earlier output at exit": (
        "import atexit, os\ndef rewrite():\n    for fd in map(int, os.listdir('/proc/self/fd')):\n        try:\n"
        "            os.pwrite(fd, b'2:T;' * 20, 0)\n        except OSError:\n            pass\natexit.register(rewrite)\n{stub}"),
    "an object equal to everything": (
        "class Always:\n    __eq__ = lambda self, other: True\n    __ne__ = lambda self, other: False\n"
        "    __hash__ = lambda self: 0\n    __bool__ = lambda self: True\n"
        "def {name}(*args, **kwargs):\n    return Always()"),
    "returning the expected value from the test source": (
        "import ast, gc, sys\ndef {name}(*args, **kwargs):\n    for o in gc.get_objects():\n"
        "        if isinstance(o, str) and ('assert' in o or 'def check' in o):\n"
        "            for node in ast.walk(ast.parse(o)):\n                if isinstance(node, ast.Compare):\n"
        "                    try:\n                        return ast.literal_eval(node.comparators[0])\n"
        "                    except Exception:\n                        pass\n    return None"),
    "filling the trainer's disk through its stdio": (
        "import ctypes, os\nlibc = ctypes.CDLL(None)\nfor fd in (0, 1, 2):\n"
        "    libc.fallocate(fd, 1, ctypes.c_long(0), ctypes.c_long(3 << 30))\n{stub}"),
    "detached shared memory": (
        "import ctypes\nlibc = ctypes.CDLL(None)\nlibc.shmat.restype = ctypes.c_void_p\n"
        "shm = libc.shmget(0, ctypes.c_size_t(1 << 30), 0o1600)\nif shm >= 0:\n    ctypes.memset(libc.shmat(shm, None, 0), 1, 1 << 30)\n{stub}"),
    "setsid children spinning": (
        "import os\nfor _ in range(15):\n    if os.fork() == 0:\n        try:\n            os.setsid()\n        except OSError:\n"
        "            pass\n        while True:\n            pass\n{stub}"),
    "a forged sandbox failure": "import sys\nsys.stderr.write('bwrap: Creating new namespace failed\\n')\nsys.exit(1)\n{stub}",
}
"""Each hack, as module code a response adds, and a wrong function ({stub}) or its own ({name})."""


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()[:PROBLEMS]]


def hacks(name: str) -> list[str]:
    stub = f"def {name}(*args, **kwargs):\n    return None"
    return [f"```python\n{code.format(stub=stub, name=name)}\n```" for code in HACKS.values()]


@pytest.fixture(scope="module")
def responses(tmp_path_factory) -> dict[str, Path]:
    """Response files for the scripted rollout: canonical solutions, and every hack, by prompt id."""
    folder = tmp_path_factory.mktemp("responses")
    canonical, hacked = {}, {}
    for row in rows(HUMANEVAL):
        canonical[row["task_id"]] = [row["canonical_solution"]]
        hacked[row["task_id"]] = hacks(row["entry_point"])
    for row in rows(MBPP):
        name = row["test_list"][0].split("assert", 1)[1].split("(", 1)[0].strip()
        canonical[f"mbpp/{row['task_id']}"] = [f"```python\n{row['code']}\n```"]
        hacked[f"mbpp/{row['task_id']}"] = hacks(name)
    paths = {"canonical": folder / "canonical.json", "hacked": folder / "hacked.json"}
    paths["canonical"].write_text(json.dumps(canonical))
    paths["hacked"].write_text(json.dumps(hacked))
    return paths


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    """The scripted rollout pip-installed into a directory of its own, visible through PYTHONPATH."""
    site = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    str(site), str(PLUGIN)], check=True, capture_output=True)
    return {**os.environ, "PYTHONPATH": str(site)}


def rlcore(env: dict[str, str], *args: object) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "rlcore", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def evaluate(env: dict[str, str], responses: Path, data: Path, samples: int, out: Path) -> dict:
    rlcore(env, "eval", "--rollout", "scripted", "--task", "code", "--limit", PROBLEMS, "--samples", samples,
           "--set", f"rollout.responses={responses}", "--set", f"task.test_path={data}", "--set", "task.max_workers=2",
           "--out", out)
    return json.loads(out.read_text())


@pytest.mark.slow  # ~1-2 min: two pip-installed commands, 60 hostile responses
@pytest.mark.parametrize("data", [HUMANEVAL, MBPP], ids=["humaneval", "mbpp"])
def test_rlcore_eval_scores_every_hack_zero(env, responses, data, tmp_path):
    right = evaluate(env, responses["canonical"], data, 1, tmp_path / "canonical.json")
    assert right["pass_at"]["pass@1"] == 1.0 and right["reward_mean"] == 1.0 and right["reward_errors"] == 0
    hacked = evaluate(env, responses["hacked"], data, len(HACKS), tmp_path / "hacked.json")
    assert hacked["samples_per_problem"] == len(HACKS) and hacked["problems"] == PROBLEMS
    assert hacked["reward_mean"] == 0.0 and hacked["pass_at"]["pass@1"] == 0.0 and hacked["reward_errors"] == 0


@pytest.mark.slow  # ~30 s: one training step on the tiny model with hacked responses
def test_rlcore_run_gives_hacks_no_reward(env, responses, tmp_path):
    run_dir, train = tmp_path / "run", tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(row) + "\n" for row in rows(HUMANEVAL)))  # the problems with responses
    rlcore(env, "run", "--rollout", "scripted", "--task", "code", "--steps", 1, "--run-dir", run_dir,
           "--set", f"rollout.responses={responses['hacked']}", "--set", f"task.train_path={train}",
           "--set", f"trainer.prompts_per_step={PROBLEMS}", "--set", f"sampling.n={len(HACKS)}")
    (step,) = MetricsLog.read(run_dir / "metrics.jsonl")
    assert step["reward/mean"] == 0.0 and step["score/reward_error"] == 0.0 and step["score/has_code"] == 1.0
