"""`from_pretrained(path, image_size=N)`: the stored position embedding resampled as timm does, for every class."""

import logging

import pytest
import torch
import transformers
from timm.layers import resample_abs_pos_embed

from deit_hf import (
    DeiTConfig,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    DeiTModel,
)

from .conftest import TINY

CLASSES = (DeiTForImageClassificationWithTeacher, DeiTForImageClassification, DeiTModel)


def embeddings_of(model):
    return (model.deit if hasattr(model, "deit") else model).embeddings


def randomized_position_embeddings(model):
    with torch.no_grad():  # a smooth-free random embedding: any slip in rows or grid order shows
        embeddings_of(model).position_embeddings.normal_(generator=torch.Generator().manual_seed(0))
    return model


@pytest.fixture(params=["deit_hf", "transformers"])
def checkpoint(request, tmp_path):
    """A 32 px (8x8 patch grid) checkpoint with a distillation token, saved by deit_hf or by transformers."""
    torch.manual_seed(0)
    if request.param == "deit_hf":
        model = DeiTForImageClassificationWithTeacher(DeiTConfig(**TINY))
    else:
        model = transformers.DeiTForImageClassificationWithTeacher(transformers.DeiTConfig(**TINY, layer_norm_eps=1e-6))
    randomized_position_embeddings(model).save_pretrained(tmp_path)
    return tmp_path, embeddings_of(model).position_embeddings.detach().clone()


@pytest.mark.parametrize("model_class", CLASSES)
@pytest.mark.parametrize("image_size, grid", [(64, 16), (48, 12)])
def test_loading_at_another_size_resamples_as_timm(checkpoint, model_class, image_size, grid, caplog):
    path, stored = checkpoint
    with caplog.at_level(logging.INFO):
        model, info = model_class.from_pretrained(path, image_size=image_size, output_loading_info=True)
    assert not info["mismatched_keys"] and not [key for key in info["missing_keys"] if "embeddings" in key]
    loaded = embeddings_of(model).position_embeddings
    assert loaded.shape == (1, 2 + grid * grid, TINY["hidden_size"])
    expected = resample_abs_pos_embed(stored, new_size=[grid, grid], num_prefix_tokens=2)
    torch.testing.assert_close(loaded, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(loaded[:, :2], stored[:, :2], atol=0, rtol=0)  # cls and dist rows kept as stored
    lines = [record.getMessage() for record in caplog.records if "position embeddings resampled" in record.getMessage()]
    assert lines == [f"deit.embeddings.position_embeddings: position embeddings resampled from a 8x8 to a {grid}x"
                     f"{grid} patch grid (bicubic)."] or model_class is DeiTModel
    pixel_values = torch.randn(2, 3, image_size, image_size)
    with torch.no_grad():
        assert model(pixel_values)[0].isfinite().all()  # runs at the new size without interpolate_pos_encoding


def test_loading_at_the_stored_size_is_unchanged(checkpoint, caplog):
    path, stored = checkpoint
    with caplog.at_level(logging.INFO):
        model = DeiTForImageClassificationWithTeacher.from_pretrained(path, image_size=32)
    torch.testing.assert_close(embeddings_of(model).position_embeddings, stored, atol=0, rtol=0)
    assert "resampled" not in caplog.text


def test_the_model_loaded_at_a_new_size_saves_and_reloads_at_that_size(checkpoint, tmp_path):
    path, _ = checkpoint
    model = DeiTForImageClassificationWithTeacher.from_pretrained(path, image_size=64)
    model.save_pretrained(tmp_path / "at64")
    again = DeiTForImageClassificationWithTeacher.from_pretrained(tmp_path / "at64")
    assert again.config.image_size == 64
    torch.testing.assert_close(embeddings_of(again).position_embeddings, embeddings_of(model).position_embeddings)


def test_downsampling_works_with_a_warning(checkpoint, caplog):
    path, stored = checkpoint
    with caplog.at_level(logging.WARNING):
        model = DeiTForImageClassificationWithTeacher.from_pretrained(path, image_size=16)
    expected = resample_abs_pos_embed(stored, new_size=[4, 4], num_prefix_tokens=2)  # antialiased, as timm shrinks
    torch.testing.assert_close(embeddings_of(model).position_embeddings, expected, atol=1e-5, rtol=0)
    assert "downsampling below the checkpoint's size" in caplog.text


def test_a_size_the_patch_does_not_divide_is_a_one_line_error(checkpoint):
    path, _ = checkpoint
    with pytest.raises(ValueError, match=r"^`image_size` height \(30\) must be a positive multiple of `patch_size` "
                                         r"\(4\)\.$"):
        DeiTForImageClassificationWithTeacher.from_pretrained(path, image_size=30)


def test_heads_of_another_class_count_are_still_replaced_with_ignore_mismatched_sizes(checkpoint):
    path, stored = checkpoint
    model, info = DeiTForImageClassificationWithTeacher.from_pretrained(
        path, image_size=64, num_labels=7, ignore_mismatched_sizes=True, output_loading_info=True
    )
    assert {key for key, *_ in info["mismatched_keys"]} == {
        "cls_classifier.weight", "cls_classifier.bias", "distillation_classifier.weight", "distillation_classifier.bias"
    }
    expected = resample_abs_pos_embed(stored, new_size=[16, 16], num_prefix_tokens=2)
    torch.testing.assert_close(embeddings_of(model).position_embeddings, expected, atol=1e-5, rtol=0)


def test_transformers_own_deit_is_unchanged_by_deit_hf(checkpoint):
    path, _ = checkpoint
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):  # transformers' behaviour, deit_hf imported
        transformers.DeiTForImageClassificationWithTeacher.from_pretrained(path, image_size=64)
