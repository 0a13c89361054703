"""`trainer.keep_freed_memory`: glibc's malloc keeps freed host memory for reuse instead of mapping each large
allocation afresh (and paying its page faults again)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rlcore import host_memory
from rlcore.loop import Trainer
from rlcore.run_config import resolve

PROBE = """
import ctypes, torch
from rlcore import host_memory

class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info

def mapped_by(nbytes):
    before = libc.mallinfo2().hblkhd
    tensor = torch.empty(nbytes // 4)
    grew = libc.mallinfo2().hblkhd - before
    del tensor
    return grew

print(mapped_by(2**26) >= 2**26)  # glibc's default: 64 MiB is a fresh mapping, unmapped when freed
print(host_memory.keep_freed_memory())
print(mapped_by(2**26) == 0)  # now from the heap
print(libc.mallinfo2().fordblks >= 2**26)  # and kept there once freed
"""


def test_freed_memory_is_kept_for_reuse() -> None:
    """After `keep_freed_memory` a 64 MiB tensor comes from the heap instead of its own mapping, and its
    memory stays with the process once freed (run in a child: the setting is process-wide)."""
    libc = host_memory._glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        pytest.skip("not glibc >= 2.33 (mallinfo2): nothing to measure the heap with")
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "True", "True", "True"], out


@pytest.mark.parametrize("keep", [True, False])
def test_the_trainer_keeps_freed_memory_unless_told_not_to(monkeypatch, tmp_path: Path, keep: bool) -> None:
    """Setting a run up asks for it by default; `trainer.keep_freed_memory=false` leaves glibc's defaults."""
    calls = []
    monkeypatch.setattr(host_memory, "keep_freed_memory", lambda: calls.append(True) or True)
    trainer = Trainer(resolve({"trainer": {"steps": 1, "prompts_per_step": 1, "keep_freed_memory": keep}}),
                      tmp_path / "run", progress=False)
    try:
        trainer.setup()
    finally:
        trainer.close()
    assert calls == ([True] if keep else [])
