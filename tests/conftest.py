"""Kernel tests run the Triton kernels on CPU through the interpreter unless a GPU is present.

TRITON_INTERPRET is read when @triton.jit decorates a kernel, i.e. when dyt_kernels is imported,
so it is set here, before any project import.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
