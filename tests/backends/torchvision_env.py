"""Test-only: a torchvision that imports next to the CPU build of torch, for vLLM's Qwen2-VL / Qwen2.5-VL code.

vLLM (0.32) imports transformers' torchvision-based Qwen2-VL image processor; PyPI ships torchvision only as
a CUDA build, whose C++ operators (detection ops such as nms, which image preprocessing never calls) cannot load
next to torch's CPU build, and torchvision's Python code then fails at import while registering fake kernels
for two of them. `.ci/vllm-tests` installs that build's files aside (`<venv>/torchvision-cuda`, off the path);
`enable` puts them on the path of this process and of its children and declares the two operators (no kernels)
so torchvision imports: its image transforms are pure PyTorch and run for real. Where a CPU build of torchvision
is installed (pip's --index-url https://download.pytorch.org/whl/cpu), nothing is changed.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

ASIDE = Path(sys.prefix) / "torchvision-cuda"
"""Where .ci/vllm-tests installs the CUDA build's files: `pip install --no-deps --target <venv>/torchvision-cuda`."""
OPS = Path(__file__).resolve().parent / "torchvision_ops"


def enable() -> str | None:
    """Make `import torchvision` work here and in child processes; None when it does, else why not."""
    try:
        import torchvision  # noqa: F401 - a working build is installed
        return None
    except (ImportError, RuntimeError):
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
    if not (ASIDE / "torchvision").is_dir():
        return (f"vLLM's Qwen2.5-VL code needs torchvision, which does not import here and is not installed aside "
                f"in {ASIDE} (.ci/vllm-tests does that: pip install --no-deps --target {ASIDE} 'torchvision==0.28.*')")
    spec = importlib.util.spec_from_file_location("rlcore_torchvision_ops", OPS / "sitecustomize.py")
    sys.modules[spec.name] = module = importlib.util.module_from_spec(spec)  # kept: its Library holds the operators
    spec.loader.exec_module(module)
    sys.path.insert(0, str(ASIDE))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(OPS), str(ASIDE), *filter(None, [os.environ.get("PYTHONPATH")])])
    import torchvision  # noqa: F401

    if "transformers" in sys.modules:  # transformers caches the answer it found at its first question
        from transformers.utils import import_utils

        import_utils.is_torchvision_available.cache_clear()
        import_utils.is_torchvision_v2_available.cache_clear()
    return None
