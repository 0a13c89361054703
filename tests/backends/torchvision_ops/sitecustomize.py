"""Test-only, loaded by every Python process whose PYTHONPATH starts with this directory (the vLLM processes of
tests/backends/test_vllm_vl.py): declares the two torchvision operators that torchvision's Python code registers
fake kernels for without checking that its C++ library loaded (see `torchvision_env`)."""

import torch

_lib = torch.library.Library("torchvision", "FRAGMENT")
for _schema in ("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
                "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"):
    try:
        _lib.define(_schema)
    except RuntimeError:  # already defined: a working torchvision build loaded its C++ operators
        pass
