"""Test-session setup shared by every test file.

Without a CUDA device the Triton kernels run through the Triton interpreter (numpy on CPU
tensors): ``TRITON_INTERPRET=1`` must be set before ``mogu_kernels`` (and so the kernel
module) is first imported, i.e. here. Tests marked ``gpu`` are skipped without CUDA.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
