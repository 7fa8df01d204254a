"""A DeiT checkpoint loaded at another image size: the patch grid of its position embedding is resampled.

`DeiTForImageClassificationWithTeacher.from_pretrained(path, image_size=384)` (any deit_hf class, any deit_hf,
transformers or converted timm checkpoint) builds the model at 384 and, while its weights load, resizes the stored
position embedding to the new patch grid: the class (and distillation) rows are kept, the patch rows are resampled
bicubically by timm's `resample_abs_pos_embed` with its defaults, as timm does when a ViT changes input size
(`set_input_size`, its checkpoint filter: bicubic, antialiased). facebookresearch/deit's `--finetune` resizes with
plain bicubic; the two kernels differ slightly even when upsampling, and fine-tuning absorbs either.

The resize is a transformers weight conversion that `DeiTPreTrainedModel` adds to its own loading only (not to the
global registry, whose class-name entries would also reach transformers' own DeiT), so those classes load as before.
"""

import math

import torch
from timm.layers import resample_abs_pos_embed
from transformers.core_model_loading import ConversionOps, WeightConverter
from transformers.utils import logging

logger = logging.get_logger(__name__)

POSITION_EMBEDDINGS = "embeddings.position_embeddings"


def resample_position_embeddings(
    position_embeddings: torch.Tensor,
    new_grid: tuple[int, int],
    num_prefix_tokens: int,
    old_grid: tuple[int, int] | None = None,
) -> torch.Tensor:
    """`(1, prefix + old patches, dim)` -> `(1, prefix + new patches, dim)`: the prefix rows kept, the patch grid
    (square unless `old_grid` is given) resized with timm's defaults (bicubic, antialiased)."""
    return resample_abs_pos_embed(
        position_embeddings, new_size=list(new_grid), old_size=None if old_grid is None else list(old_grid),
        num_prefix_tokens=num_prefix_tokens, interpolation="bicubic",
    )


def square_grid(num_positions: int, num_prefix_tokens: int) -> tuple[int, int] | None:
    """The square patch grid of a position embedding with `num_positions` rows, or None when there is none."""
    side = math.isqrt(max(num_positions - num_prefix_tokens, 0))
    return (side, side) if side > 0 and side * side == num_positions - num_prefix_tokens else None


class ResamplePositionEmbeddings(ConversionOps):
    """Weight conversion: a stored position embedding whose patch grid differs from the model's is resampled to it.

    A stored embedding of the model's own shape passes unchanged, as does one that is no square grid with the
    model's prefix tokens (a checkpoint with a distillation token loaded into a model without one, say): transformers
    then reports its shape as mismatched, as it would without this conversion."""

    @torch.no_grad()
    def convert(self, input_dict, source_patterns, target_patterns, full_layer_name=None, model=None, **kwargs):
        if model is None or full_layer_name is None:  # saving: weights keep the model's own shape
            return input_dict
        embeddings = model.get_submodule(full_layer_name.rpartition(".")[0])
        new_grid, num_prefix_tokens = embeddings.patch_embeddings.grid_size, embeddings.num_prefix_tokens
        resampled = {}
        for key, tensors in input_dict.items():
            tensor = tensors[0] if isinstance(tensors, list) else tensors
            old_grid = square_grid(tensor.shape[1], num_prefix_tokens) if tensor.ndim == 3 else None
            if old_grid is not None and old_grid != tuple(new_grid):
                tensor = resample_position_embeddings(tensor, new_grid, num_prefix_tokens, old_grid)
                shrinking = new_grid[0] < old_grid[0] or new_grid[1] < old_grid[1]
                (logger.warning if shrinking else logger.info)(
                    "%s: position embeddings resampled from a %dx%d to a %dx%d patch grid (bicubic)%s.",
                    full_layer_name, *old_grid, *new_grid,
                    "; downsampling below the checkpoint's size loses positional detail" if shrinking else "",
                )
            resampled[key] = tensor
        return resampled

    @property
    def reverse_op(self) -> ConversionOps:
        return self


def position_embedding_resampling() -> WeightConverter:
    """The weight conversion that resamples a stored position embedding to the model's patch grid."""
    return WeightConverter(POSITION_EMBEDDINGS, POSITION_EMBEDDINGS, operations=[ResamplePositionEmbeddings()])


__all__ = ["ResamplePositionEmbeddings", "position_embedding_resampling", "resample_position_embeddings"]
