"""Shared fixtures: tiny DeiT configs (as transformers' own DeiT tester: image 32, patch 4, hidden 32, 2 layers)."""

import os

import pytest
import torch

# No hub here; any accidental download must fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# One intra-op thread: on 2 cores, a second thread spinning against DataLoader workers, subprocesses or another
# job slows small ops tens of times; one thread keeps the suite's time steady.
torch.set_num_threads(1)

TINY = dict(
    image_size=32,
    patch_size=4,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    num_labels=3,
)


@pytest.fixture
def tiny_config():
    from deit_hf import DeiTConfig

    return DeiTConfig(**TINY)


@pytest.fixture
def pixel_values():
    return torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
