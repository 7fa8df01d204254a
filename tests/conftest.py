"""Shared fixtures: tiny DeiT configs (as transformers' own DeiT tester: image 32, patch 4, hidden 32, 2 layers)."""

import functools
import os
import tempfile

import PIL.Image
import pytest
import timm
import timm.data
import torch

# No hub here; any accidental download must fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# The training command's kept options (training.cli_options) go to a cache of the suite's own, not the user's.
os.environ["DEIT_HF_CACHE"] = tempfile.mkdtemp(prefix="deit-hf-test-cache-")
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


@pytest.fixture(scope="module")
def timm_eval_transform():
    """The DeiT recipe's eval transform as timm builds it (crop_pct 0.875; timm's own DeiT default is 0.9)."""

    @functools.cache  # building the model is the slow part
    def build(resolution: int):
        model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False)
        overrides = {"crop_pct": 0.875, "input_size": (3, resolution, resolution)}
        return timm.data.create_transform(**timm.data.resolve_data_config(overrides, model=model))

    return build


@pytest.fixture(scope="module")
def gray():
    """An 8-bit grey photo and the RGB image that replicates it."""
    from tests.test_image_processing import photo

    gray = photo("astronaut").convert("L")
    return gray, PIL.Image.merge("RGB", [gray] * 3)
