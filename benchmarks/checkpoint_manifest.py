"""What sealing a checkpoint with its manifest costs, next to writing it.

Builds a SmolLM2-135M-shaped Llama (random weights, offline) with AdamW state, then in alternating rounds
writes a checkpoint as the torch backend does (model.safetensors + trainer.pt, fsynced) and seals it with
`rlcore.checkpoint.write_manifest` (fsync + CRC-32 of every file, in threads), verifies it as a resume does,
and hashes the same files with SHA-256 (threaded alike) for comparison. Prints each as a ratio to the write,
measured side by side (the machine's speed drifts; read the ratios).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/checkpoint_manifest.py --rounds 3
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from rlcore.checkpoint import verify, write_manifest  # noqa: E402

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)


def build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The model and an AdamW that has taken one step (so its state holds both moments)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    return model, optimizer


def write(model: torch.nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """A torch-backend checkpoint: the model directory and trainer.pt, fsynced."""
    (directory / "backend").mkdir(parents=True)
    model.save_pretrained(directory / "backend" / "model")
    torch.save({"optimizer": optimizer.state_dict()}, directory / "backend" / "trainer.pt")
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_all(directory: Path) -> None:
    """SHA-256 of every file, threaded as the manifest's CRC-32s are (hashlib releases the GIL too)."""
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    with ThreadPoolExecutor(max(1, min(len(files), os.cpu_count() or 1, 8))) as pool:
        list(pool.map(sha256, files))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    model, optimizer = build()
    params = sum(p.numel() for p in model.parameters())
    times: dict[str, list[float]] = {"write": [], "manifest": [], "verify": [], "sha256": []}
    size = 0
    for _ in range(args.rounds):
        root = Path(tempfile.mkdtemp(prefix="rlcore-manifest-bench-"))
        try:
            t0 = time.perf_counter()
            write(model, optimizer, root)
            t1 = time.perf_counter()
            write_manifest(root, ["backend"], step=1)
            t2 = time.perf_counter()
            assert verify(root, ["backend"]) is None
            t3 = time.perf_counter()
            sha256_all(root)
            t4 = time.perf_counter()
            size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
        finally:
            shutil.rmtree(root)
        for key, seconds in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            times[key].append(seconds)
    write_s = statistics.median(times["write"])
    print(f"checkpoint: SmolLM2-135M shape ({params / 1e6:.0f}M parameters), model + AdamW state, "
          f"{size / 2**30:.2f} GiB; {os.cpu_count()} CPUs; median of {args.rounds} rounds")
    for key, label in (("write", "write + fsync (the save itself)"),
                       ("manifest", "manifest: fsync + CRC-32, threaded (what a save adds)"),
                       ("verify", "verify: sizes + CRC-32, threaded (what a resume adds)"),
                       ("sha256", "SHA-256 of the same files, threaded (the alternative)")):
        s = statistics.median(times[key])
        print(f"  {label:58s} {s:7.2f} s  {s / write_s:5.2f}x the write  ({size / s / 2**30:.2f} GiB/s)")


if __name__ == "__main__":
    main()
