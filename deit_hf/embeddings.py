"""The DeiT input sequence: patch embeddings, the class and distillation tokens, and a learned position embedding
per token (resized for another image size with `interpolate_pos_encoding`). `deit_hf.modeling_deit` builds its
models on them and re-exports both classes; module names are those of transformers' DeiT checkpoints."""

import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from .configuration_deit import DeiTConfig


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (list, tuple)) else (value, value)


class DeiTPatchEmbeddings(nn.Module):
    """Turns `(batch, channels, height, width)` pixels into `(batch, num_patches, hidden_size)` patch embeddings."""

    def __init__(self, config: DeiTConfig):
        super().__init__()
        self.image_size = _pair(config.image_size)
        self.patch_size = _pair(config.patch_size)
        self.grid_size = (self.image_size[0] // self.patch_size[0], self.image_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.num_channels = config.num_channels
        self.projection = nn.Conv2d(config.num_channels, config.hidden_size, self.patch_size, stride=self.patch_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.ndim != 4 or pixel_values.shape[1] != self.num_channels:
            raise ValueError(
                f"Expected pixel_values of shape (batch, {self.num_channels}, height, width), "
                f"got {tuple(pixel_values.shape)}."
            )
        return self.projection(pixel_values).flatten(2).transpose(1, 2)


class DeiTEmbeddings(nn.Module):
    """The `[cls, dist, patches]` sequence (`[cls, patches]` without a distillation token) plus one learned position
    embedding per token."""

    def __init__(self, config: DeiTConfig):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.distillation_token = (
            nn.Parameter(torch.zeros(1, 1, config.hidden_size)) if config.use_distillation_token else None
        )
        self.num_prefix_tokens = 2 if config.use_distillation_token else 1
        self.patch_embeddings = DeiTPatchEmbeddings(config)
        self.position_embeddings = nn.Parameter(
            torch.zeros(1, self.patch_embeddings.num_patches + self.num_prefix_tokens, config.hidden_size)
        )
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def interpolate_pos_encoding(self, height: int, width: int) -> torch.Tensor:
        """Position embeddings resized (bicubic) to an image of `height` x `width`; the special tokens keep theirs."""
        patch_height, patch_width = self.patch_embeddings.patch_size
        return resample_abs_pos_embed(
            self.position_embeddings,
            new_size=[height // patch_height, width // patch_width],
            old_size=list(self.patch_embeddings.grid_size),
            num_prefix_tokens=self.num_prefix_tokens,
            interpolation="bicubic",
            antialias=False,  # transformers' DeiT/ViT interpolation, so fine-tuned checkpoints behave alike
        )

    def forward(self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False) -> torch.Tensor:
        height, width = pixel_values.shape[-2:]
        if not interpolate_pos_encoding and (height, width) != self.patch_embeddings.image_size:
            raise ValueError(
                f"Input image size ({height}*{width}) doesn't match model "
                f"({self.patch_embeddings.image_size[0]}*{self.patch_embeddings.image_size[1]}); "
                "pass interpolate_pos_encoding=True to run at another size."
            )
        embeddings = self.patch_embeddings(pixel_values)
        batch_size = embeddings.shape[0]
        tokens = (self.cls_token, self.distillation_token) if self.distillation_token is not None else (self.cls_token,)
        embeddings = torch.cat([*(token.expand(batch_size, -1, -1) for token in tokens), embeddings], dim=1)
        position_embeddings = (
            self.interpolate_pos_encoding(height, width) if interpolate_pos_encoding else self.position_embeddings
        )
        return self.dropout(embeddings + position_embeddings)


__all__ = ["DeiTEmbeddings", "DeiTPatchEmbeddings"]
