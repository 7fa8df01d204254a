"""DeiT configuration: the ViT backbone with a distillation token, plus the distillation loss settings."""

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.utils import logging

from .distillation_types import get_distillation_type

logger = logging.get_logger(__name__)

TRANSFORMERS_MODEL_TYPE = "deit"  # transformers' own DeiT, whose checkpoints load into deit_hf's classes

# Sizes from the paper (Table 1); all 12 layers, patch 16, MLP ratio 4.
_SIZES = {
    "tiny": {"hidden_size": 192, "num_attention_heads": 3, "intermediate_size": 768},
    "small": {"hidden_size": 384, "num_attention_heads": 6, "intermediate_size": 1536},
    "base": {"hidden_size": 768, "num_attention_heads": 12, "intermediate_size": 3072},
}
PRESETS = {
    f"deit-{size}-distilled-patch16-{image_size}": {**_SIZES[size], "image_size": image_size}
    for size, image_size in (("tiny", 224), ("small", 224), ("base", 224), ("base", 384))
}


@strict
class DeiTConfig(PreTrainedConfig):
    r"""
    Configuration of a DeiT model (Touvron et al. 2021): a ViT whose token sequence is `[cls, dist, patches]`.

    The architecture fields are those of transformers' `DeiTConfig`, with DeiT's own `layer_norm_eps=1e-6`
    (timm and facebookresearch/deit use it; transformers' default of 1e-12 is not DeiT's). The defaults
    describe DeiT-B⚗ at 224.

    use_distillation_token (`bool`, defaults to `True`):
        Whether the sequence carries the distillation token (DeiT⚗). `False` is the paper's DeiT without one, as
        timm's `deit_*_patch16_224`: one class head, trained on the labels and, with a teacher, on the "usual
        distillation" of the paper's Table 3 (`DeiTForImageClassification`).
    drop_path_rate (`float`, defaults to 0.0):
        Stochastic depth rate of the last layer; it grows linearly from 0 over the layers (the recipe uses 0.1).
    distillation_type (`str`, defaults to `"hard"`):
        `"hard"`: the distillation head (the class head of a model without a distillation token) learns the
        teacher's argmax; `"soft"`: KL to the teacher's softened distribution; `"none"`: no teacher, both heads
        trained on the cross-entropy of the fused logits; `"labels"`: no teacher, each head trained on the labels
        (the distillation token as a second class token: the paper's two-class-token control; needs the token).
    distillation_alpha (`float`, defaults to 0.5):
        Weight of the distillation loss; the class-token loss gets `1 - alpha`.
    distillation_tau (`float`, defaults to 1.0):
        Temperature of the soft distillation loss (unused by hard and none).
    label_smoothing (`float`, defaults to 0.0):
        Smoothing of the class-token loss on hard labels (the recipe's 0.1 reaches it through Mixup's soft
        targets, or through this field when Mixup is off). Never applied to the teacher's targets.

    Example:

    ```python
    >>> from deit_hf import DeiTConfig, DeiTForImageClassificationWithTeacher
    >>> config = DeiTConfig.from_preset("deit-tiny-distilled-patch16-224")
    >>> model = DeiTForImageClassificationWithTeacher(config)
    ```"""

    model_type = "deit_hf"
    # scalars kept out of Trainer's gathered predictions
    keys_to_ignore_at_inference = ["base_loss", "distillation_loss"]

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float | int = 0.0
    attention_probs_dropout_prob: float | int = 0.0
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-6
    image_size: int | list[int] | tuple[int, int] = 224
    patch_size: int | list[int] | tuple[int, int] = 16
    num_channels: int = 3
    qkv_bias: bool = True
    use_distillation_token: bool = True
    drop_path_rate: float | int = 0.0
    distillation_type: str = "hard"
    distillation_alpha: float | int = 0.5
    distillation_tau: float | int = 1.0
    label_smoothing: float | int = 0.0

    def __post_init__(self, **kwargs):
        # Checked here rather than in `validate_*` methods so that nonsense raises a plain ValueError.
        self._check_fields()
        super().__post_init__(**kwargs)
        if not self.use_distillation_token and not self.architectures:
            # the Auto classes build the one class that fits (their default, the distilled model, needs the token)
            self.architectures = ["DeiTForImageClassification"]

    def _check_fields(self):
        for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "num_channels"):
            if getattr(self, field) <= 0:
                raise ValueError(f"`{field}` must be positive, got {getattr(self, field)}.")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) must be divisible by `num_attention_heads` "
                f"({self.num_attention_heads})."
            )
        for side, image, patch in zip(("height", "width"), _pair(self.image_size), _pair(self.patch_size), strict=True):
            if patch <= 0 or image % patch:
                raise ValueError(
                    f"`image_size` {side} ({image}) must be a positive multiple of `patch_size` ({patch})."
                )
        for field in ("drop_path_rate", "hidden_dropout_prob", "attention_probs_dropout_prob", "label_smoothing"):
            if not 0.0 <= getattr(self, field) < 1.0:
                raise ValueError(f"`{field}` must be in [0, 1), got {getattr(self, field)}.")
        if get_distillation_type(self.distillation_type).needs_distillation_token and not self.use_distillation_token:
            raise ValueError(f"`distillation_type={self.distillation_type!r}` trains the distillation token as a "
                             "second class token, but `use_distillation_token=False`: use 'none' to train the one "
                             "class head.")
        if not 0.0 <= self.distillation_alpha <= 1.0:
            raise ValueError(f"`distillation_alpha` must be in [0, 1], got {self.distillation_alpha}.")
        if self.distillation_tau <= 0:
            raise ValueError(f"`distillation_tau` must be positive, got {self.distillation_tau}.")

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        # A transformers DeiT folder (the hub's facebook/deit-*) holds this architecture under transformers' own
        # model_type: say so once, instead of transformers' generic "can yield errors" warning.
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        if config_dict.get("model_type") == TRANSFORMERS_MODEL_TYPE:
            logger.warning_once(
                f"Loading transformers' DeiT checkpoint {pretrained_model_name_or_path} (model_type 'deit') into "
                "deit_hf: same architecture and weights, with the layer_norm_eps its config gives."
            )
            config_dict = {**config_dict, "model_type": cls.model_type}
        return config_dict, kwargs

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        # `from_pretrained(path, image_size=...)` sets its overrides after construction: check them too.
        loaded = super().from_dict(config_dict, **kwargs)
        (loaded[0] if isinstance(loaded, tuple) else loaded)._check_fields()
        return loaded

    @classmethod
    def from_preset(cls, name: str, **kwargs) -> "DeiTConfig":
        """A DeiT⚗ configuration from the paper by name (see `PRESETS`); `kwargs` override its fields."""
        if name not in PRESETS:
            raise ValueError(f"Unknown DeiT preset {name!r}; known presets: {sorted(PRESETS)}.")
        return cls(**{**PRESETS[name], **kwargs})


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (list, tuple)) else (value, value)


__all__ = ["DeiTConfig", "PRESETS"]
