"""`dtype: auto` for the torch backend and the hf rollout: float32 or bfloat16_matched, whichever this machine
runs faster at the model's shapes, measured once per machine and cached.

Both candidates keep the rollout's logprobs equal to the trainer's (README: "Precision"); plain bfloat16 is
never chosen, since it does not. Which is faster is a property of the CPU: bf16 GEMMs ran 2.1x faster than
fp32 on an EPYC with AVX512-BF16 and 5-12x slower on an AVX2-only one. The probe times every distinct decoder
`Linear` shape (weighted by how many layers have it) in the two regimes a step runs: a trainer pass (forward
and backward over `TRAIN_ROWS` rows) and a decode step (a no-grad forward over `DECODE_ROWS` rows).
bfloat16_matched wins when it is at least `MARGIN` faster in the trainer pass and no slower in decode.
Attention is not timed: matched runs it in float64, which is why its step gains less than its GEMMs do.

The choice is made for both sides at once, so they agree: an explicit dtype on the other side is followed,
and a pair other than torch + hf gets float32. The measurements are cached per machine (CPU, its flags,
torch version, threads) in `cache_path()`, under a file lock, so two processes (Ray workers) read the same
figures.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import torch

from rlcore.toolkit.tis import AGREEING
from rlcore_backends.common.matched import MatchedLinear, invariant_chunk, linear_counts

log = logging.getLogger("rlcore")

PARTNERS = {"backend": "torch", "rollout": "hf"}
"""The plugins that can both run bfloat16_matched, by config section."""
TRAIN_ROWS, DECODE_ROWS = 256, 16
MARGIN = 1.1
REPEATS = 3

Shapes = dict[tuple[int, int], int]
"""(inner, outer) dimensions of the decoder's `Linear` layers and how many layers have each."""


@attrs.frozen
class Choice:
    """The dtype `auto` stands for, and why, in one line."""

    dtype: str
    reason: str


def config_counts(model_config: Any) -> Shapes | None:
    """The decoder's `Linear` shapes from a transformers config, built on the meta device (no weights), or None
    when transformers cannot build a causal LM from it."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return linear_counts(AutoModelForCausalLM.from_config(model_config))
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def choose(config: dict[str, Any], section: str, shapes: Callable[[], Shapes | None]) -> Choice:
    """What `{section}.dtype: auto` (section: backend or rollout) means in this resolved `config` (plain
    values, as config.yaml holds them); `shapes` gives the model's `Linear` shapes when a measurement is due."""
    other = "rollout" if section == "backend" else "backend"
    plugins = config.get("plugins")
    if not plugins:
        return Choice("float32", "the run's other side is unknown (a plugin set up alone)")
    for kind, name in PARTNERS.items():
        if plugins.get(kind) != name:
            return Choice("float32", f"bfloat16_matched needs the torch backend with the hf rollout, and the "
                                     f"{kind} is {plugins.get(kind)!r}")
    theirs = (config.get(other) or {}).get("dtype", "float32")
    if theirs != "auto":
        agree = ", so both sides compute the same logprobs" if theirs in AGREEING else ""
        return Choice(theirs, f"the same as {other}.dtype{agree}")
    counts = shapes()
    if not counts:
        return Choice("float32", "the model's layer shapes could not be read to measure bfloat16_matched")
    return decide(measured(counts))


def settle_dtype(config: dict[str, Any], section: str, shapes: Callable[[], Shapes | None]) -> str:
    """`choose`'s dtype, said on the console with its reason."""
    choice = choose(config, section, shapes)
    log.info("%s.dtype=auto is %s: %s", section, choice.dtype, choice.reason)
    return choice.dtype


def decide(probe: dict[str, Any]) -> Choice:
    """float32 or bfloat16_matched from a probe's timings (seconds per regime; see `measure`)."""
    fp32, bf16 = probe["float32"], probe.get("bfloat16_matched")
    if bf16 is None:
        return Choice("float32", probe["why"])
    train, decode = fp32["train"] / bf16["train"], fp32["decode"] / bf16["decode"]
    figures = f"bfloat16_matched is {train:.2f}x float32's speed in a trainer pass and {decode:.2f}x in decode"
    if train >= MARGIN and decode >= 1.0:
        return Choice("bfloat16_matched", f"{figures} on this machine")
    return Choice("float32", f"{figures} on this machine (it needs {MARGIN}x and 1x)")


def measured(counts: Shapes) -> dict[str, Any]:
    """The probe of `counts` on this machine: from the cache, else measured now and cached."""
    key = f"{machine()} | shapes {sorted(counts.items())}"
    path = cache_path()
    with _locked(path):
        cache = _read(path)
        if key not in cache:
            cache[key] = measure(counts)
            _write(path, cache)
    return cache[key]


def measure(counts: Shapes) -> dict[str, Any]:
    """Seconds of one trainer pass and one decode step over all `counts` layers, in float32 and, where a bf16
    GEMM can be faster at all and some chunk keeps rows invariant, in bfloat16_matched."""
    fp32 = _time_layers(counts, None)
    plain = _time_layers(counts, max(k for k, _ in counts))
    if fp32["train"] / plain["train"] < MARGIN:
        return {"float32": fp32, "why": f"a bfloat16 GEMM runs {fp32['train'] / plain['train']:.2f}x float32's "
                                        f"speed here, below the {MARGIN}x bfloat16_matched needs"}
    chunk = invariant_chunk(tuple(sorted(counts)))
    if chunk is None:
        return {"float32": fp32, "why": "no bfloat16 GEMM chunk is row-invariant on this machine"}
    return {"float32": fp32, "bfloat16_matched": _time_layers(counts, chunk), "chunk": chunk}


def _time_layers(counts: Shapes, chunk: int | None) -> dict[str, float]:
    """Best-of-`REPEATS` seconds of the count-weighted layers (float32 `Linear`, or `MatchedLinear` at `chunk`)."""
    generator = torch.Generator().manual_seed(0)
    out = {"train": 0.0, "decode": 0.0}
    for (inner, outer), count in counts.items():
        layer = torch.nn.Linear(inner, outer, bias=False)
        if chunk is not None:
            layer.__class__, layer.chunk = MatchedLinear, chunk
        train_x = torch.randn(TRAIN_ROWS, inner, generator=generator, requires_grad=True)
        decode_x = torch.randn(DECODE_ROWS, inner, generator=generator)

        def train() -> None:
            layer(train_x).sum().backward()

        def decode() -> None:
            with torch.no_grad():
                layer(decode_x)

        for regime, run in (("train", train), ("decode", decode)):
            run()  # warm-up (and the decode's bf16 weight cache)
            best = min(_seconds(run) for _ in range(REPEATS))
            out[regime] += count * best
    return out


def _seconds(run: Callable[[], None]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def machine() -> str:
    """What the measurement depends on: the CPU model and its vector flags, torch's version and threads."""
    name, flags = "", ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            field, _, value = line.partition(":")
            if field.strip() == "model name" and not name:
                name = value.strip()
            if field.strip() == "flags" and not flags:
                flags = " ".join(sorted(f for f in value.split() if f.startswith(("avx", "amx", "fma"))))
    return f"{name or os.uname().machine} [{flags}] torch {torch.__version__} threads {torch.get_num_threads()}"


def cache_path() -> Path:
    """`$RLCORE_CACHE_DIR/auto_dtype.json`, by default `$XDG_CACHE_HOME/rlcore/` (`~/.cache/rlcore/`)."""
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rlcore"
    return Path(os.environ.get("RLCORE_CACHE_DIR") or default) / "auto_dtype.json"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock next to the cache, so concurrent runs measure once; no lock where nothing can be
    written (the probe is then measured per process)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path.with_suffix(".lock"), "a")
    except OSError:
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _read(path: Path) -> dict[str, Any]:
    """The cache, or nothing when it is missing or unreadable (it is measured again and rewritten)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write(path: Path, cache: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(cache, indent=1))
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        log.warning("dtype auto: could not cache the measurement in %s (%s); it is measured again next run", path, e)
