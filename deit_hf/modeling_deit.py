"""DeiT: a ViT whose sequence is [cls, dist, patches], with a class head and a distillation head (Touvron et al. 2021).

Module and parameter names are those of transformers' DeiT checkpoints (facebook/deit-*-distilled-*), so their
`model.safetensors` loads as is; `deit_hf.convert` maps timm/facebookresearch checkpoints onto the same names.
`config.use_distillation_token=False` gives the paper's DeiT without a distillation token ([cls, patches]).
`from_pretrained(path, image_size=N)` loads a checkpoint at another size (`deit_hf.position_embeddings`). The input
sequence's modules live in `deit_hf.embeddings` (re-exported here); a saved checkpoint carries both files.
"""

import dataclasses
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_deit import DeiTConfig
from .embeddings import DeiTEmbeddings, DeiTPatchEmbeddings
from .losses import DistillationLoss
from .modeling_outputs import DeiTForImageClassificationOutput, DeiTForImageClassificationWithTeacherOutput
from .position_embeddings import position_embedding_resampling


def _classifier(config: DeiTConfig) -> nn.Module:
    # num_labels=0 turns a head into the identity, for feature extraction as in transformers
    return nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()


def _refuse_teacher_logits_without_labels(labels, teacher_logits) -> None:
    if teacher_logits is not None and labels is None:
        raise ValueError("`teacher_logits` were given without `labels`: the teacher only enters the training loss, "
                         "which needs the labels. Pass `labels`, or drop `teacher_logits` for inference.")


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


class DeiTSelfAttention(nn.Module):
    """Multi-head self-attention; the kernel (eager, sdpa, flash, flex) follows `config._attn_implementation`."""

    def __init__(self, config: DeiTConfig):
        super().__init__()
        self.config = config
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.query = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.key = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.value = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        input_shape = hidden_states.shape[:-1]
        heads_shape = (*input_shape, -1, self.head_dim)
        query = self.query(hidden_states).view(heads_shape).transpose(1, 2)
        key = self.key(hidden_states).view(heads_shape).transpose(1, 2)
        value = self.value(hidden_states).view(heads_shape).transpose(1, 2)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            None,
            scaling=self.scaling,
            dropout=self.config.attention_probs_dropout_prob if self.training else 0.0,
            **kwargs,
        )
        return attn_output.reshape(*input_shape, -1), attn_weights


class DeiTOutput(nn.Module):
    """A linear layer and dropout back to the residual width: the attention's output projection and the MLP's second
    layer (`attention.output.dense` and `output.dense` in checkpoints)."""

    def __init__(self, config: DeiTConfig, in_features: int):
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.dense(hidden_states))


class DeiTAttention(nn.Module):
    """Self-attention followed by its output projection."""

    def __init__(self, config: DeiTConfig):
        super().__init__()
        self.attention = DeiTSelfAttention(config)
        self.output = DeiTOutput(config, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        attn_output, _ = self.attention(hidden_states, **kwargs)
        return self.output(attn_output)


class DeiTIntermediate(nn.Module):
    """First MLP layer and its activation (exact GELU for DeiT)."""

    def __init__(self, config: DeiTConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.intermediate_act_fn(self.dense(hidden_states))


class DeiTLayer(GradientCheckpointingLayer):
    """Pre-norm transformer block: x + DropPath(Attn(LN(x))), then x + DropPath(MLP(LN(x)))."""

    def __init__(self, config: DeiTConfig, drop_path_rate: float = 0.0):
        super().__init__()
        self.layernorm_before = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = DeiTAttention(config)
        self.layernorm_after = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.intermediate = DeiTIntermediate(config)
        self.output = DeiTOutput(config, config.intermediate_size)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate > 0 else nn.Identity()

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        hidden_states = hidden_states + self.drop_path(self.attention(self.layernorm_before(hidden_states), **kwargs))
        mlp_output = self.output(self.intermediate(self.layernorm_after(hidden_states)))
        return hidden_states + self.drop_path(mlp_output)


class DeiTEncoder(nn.Module):
    """The stack of blocks; stochastic depth grows linearly from 0 to `drop_path_rate` (timm's schedule)."""

    def __init__(self, config: DeiTConfig):
        super().__init__()
        # On the CPU whatever the default device: under `torch.device("meta")` the rates could not be read.
        rates = torch.linspace(0, config.drop_path_rate, config.num_hidden_layers, device="cpu").tolist()
        self.layer = nn.ModuleList(DeiTLayer(config, rate) for rate in rates)

    def forward(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        for layer in self.layer:
            hidden_states = layer(hidden_states, **kwargs)
        return hidden_states


# Every Auto class deit_hf registers, for a saved config's `auto_map`: without deit_hf, `trust_remote_code` resolves
# an Auto class missing there by the config's class name (DeiTConfig) to transformers' own DeiT class.
MODEL_AUTO_MAP = {
    "AutoModel": "modeling_deit.DeiTModel",
    "AutoModelForImageClassification": "modeling_deit.DeiTForImageClassificationWithTeacher",
}


class DeiTPreTrainedModel(PreTrainedModel):
    """Weight initialisation (the DeiT reference's: timm `VisionTransformerDistilled`) and shared settings."""

    config: DeiTConfig
    base_model_prefix = "deit"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["DeiTEmbeddings", "DeiTLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    _can_record_outputs = {"hidden_states": DeiTLayer, "attentions": DeiTSelfAttention}

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' `save_pretrained`, with every Auto class in `config.auto_map` (the saved class's own entry
        is transformers')."""
        self.config.auto_map = {**MODEL_AUTO_MAP, **(getattr(self.config, "auto_map", None) or {})}
        return super().save_pretrained(save_directory, *args, **kwargs)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # Tensor by tensor as timm's VisionTransformerDistilled (`init_weights` + `init_weights_vit_timm`), which
        # trains better from scratch than transformers' ViT convention (it trunc-normals the patch embedding too).
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            # q, k, v, projections, MLP and both heads: truncated normal, zero bias
            init.trunc_normal_(module.weight, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            # The patch embedding keeps PyTorch's default init, as timm leaves it: kaiming-uniform(a=sqrt(5)) weights
            # (std ~0.083 at fan-in 48) and a uniform bias in +-1/sqrt(fan_in).
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                bound = 1 / math.sqrt(module.weight[0].numel())
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, DeiTEmbeddings):
            init.trunc_normal_(module.position_embeddings, std=std)
            init.normal_(module.cls_token, std=1e-6)  # timm's (facebookresearch/deit's original: trunc-normal 0.02)
            if module.distillation_token is not None:
                init.trunc_normal_(module.distillation_token, std=std)

    @classmethod
    def _load_pretrained_model(cls, model, state_dict, checkpoint_files, load_config, expected_keys=None):
        # `from_pretrained(path, image_size=N)`: the stored position embedding is resampled to the model's patch grid
        # as it loads, before transformers compares shapes (`deit_hf.position_embeddings`).
        weight_mapping = [*(load_config.weight_mapping or []), position_embedding_resampling()]
        load_config = dataclasses.replace(load_config, weight_mapping=weight_mapping)
        return super()._load_pretrained_model(model, state_dict, checkpoint_files, load_config, expected_keys)


class DeiTModel(DeiTPreTrainedModel):
    """The bare DeiT encoder: embeddings, blocks and final LayerNorm; `last_hidden_state` is [cls, dist, patches]
    ([cls, patches] without a distillation token)."""

    def __init__(self, config: DeiTConfig):
        super().__init__(config)
        self.embeddings = DeiTEmbeddings(config)
        self.encoder = DeiTEncoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> DeiTPatchEmbeddings:
        return self.embeddings.patch_embeddings

    @merge_with_config_defaults
    @capture_outputs(tie_last_hidden_states=False)
    def forward(
        self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool | None = None, **kwargs
    ) -> BaseModelOutput:
        if kwargs.get("teacher_logits") is not None:  # the attention kernels would swallow it unread
            raise ValueError("DeiTModel computes no loss and cannot use `teacher_logits`: distil into "
                             "DeiTForImageClassification(WithTeacher) with `labels`.")
        # Processors produce float32; a bf16/fp16 model takes its own dtype, as transformers' ViT does.
        pixel_values = pixel_values.to(self.embeddings.patch_embeddings.projection.weight.dtype)
        hidden_states = self.embeddings(pixel_values, interpolate_pos_encoding=bool(interpolate_pos_encoding))
        hidden_states = self.encoder(hidden_states, **kwargs)
        return BaseModelOutput(last_hidden_state=self.layernorm(hidden_states))


class DeiTForImageClassification(DeiTPreTrainedModel):
    """
    DeiT with one linear head on the final class token: with `config.use_distillation_token=False`, the paper's DeiT
    without a distillation token (with one, as transformers' class, the token is carried but not read).

    Given `labels`, the loss is the cross-entropy of the class head; given the teacher's `teacher_logits` as well
    (`config.distillation_type` hard or soft), the paper's classical distillation of that head:
    `(1 - alpha) * CE(logits, labels) + alpha * KD(logits, teacher_logits)` (`deit_hf.losses.DistillationLoss`).
    """

    def __init__(self, config: DeiTConfig):
        super().__init__(config)
        self.deit = DeiTModel(config)
        self.classifier = _classifier(config)
        self.loss_fct = DistillationLoss.from_config(config)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        teacher_logits: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        **kwargs,
    ) -> DeiTForImageClassificationOutput:
        _refuse_teacher_logits_without_labels(labels, teacher_logits)
        outputs = self.deit(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, **kwargs)
        logits = self.classifier(outputs.last_hidden_state[:, 0])
        losses = self.loss_fct(logits, labels, teacher_logits=teacher_logits) if labels is not None else None
        return DeiTForImageClassificationOutput(
            loss=losses.loss if losses else None,
            logits=logits,
            base_loss=losses.base_loss if losses else None,
            distillation_loss=losses.distillation_loss if losses else None,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


class DeiTForImageClassificationWithTeacher(DeiTPreTrainedModel):
    """
    DeiT⚗: a head on the final class token and a head on the final distillation token.

    Inference returns their average as `logits`. Unlike transformers' class of the same name it trains: given
    `labels` (class ids, or Mixup soft targets) and, for hard/soft distillation, the teacher's `teacher_logits` on the
    same batch, it returns the loss of `deit_hf.losses.DistillationLoss` configured by `config.distillation_*`.
    Given `labels` alone (or with `distillation_type="none"`), the loss is the cross-entropy of the fused `logits`,
    which trains both heads: transformers' `Trainer`, PEFT and any Hugging Face loop fine-tune it as they are. With
    `distillation_type="labels"` each head learns the labels (two class tokens, the paper's control).
    """

    def __init__(self, config: DeiTConfig):
        if not config.use_distillation_token:
            raise ValueError("DeiTForImageClassificationWithTeacher needs the distillation token, but the config has "
                             "use_distillation_token=False: use DeiTForImageClassification (classical distillation).")
        super().__init__(config)
        self.deit = DeiTModel(config)
        self.cls_classifier = _classifier(config)
        self.distillation_classifier = _classifier(config)
        self.loss_fct = DistillationLoss.from_config(config)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        teacher_logits: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        **kwargs,
    ) -> DeiTForImageClassificationWithTeacherOutput:
        _refuse_teacher_logits_without_labels(labels, teacher_logits)
        outputs = self.deit(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding, **kwargs)
        cls_embedding, distillation_embedding = outputs.last_hidden_state[:, 0], outputs.last_hidden_state[:, 1]
        cls_logits = self.cls_classifier(cls_embedding)
        distillation_logits = self.distillation_classifier(distillation_embedding)
        losses = (
            self.loss_fct(cls_logits, labels, distillation_logits, teacher_logits) if labels is not None else None
        )
        return DeiTForImageClassificationWithTeacherOutput(
            loss=losses.loss if losses else None,
            logits=(cls_logits + distillation_logits) / 2,
            cls_logits=cls_logits,
            distillation_logits=distillation_logits,
            token_cosine_similarity=F.cosine_similarity(cls_embedding, distillation_embedding, dim=-1),
            base_loss=losses.base_loss if losses else None,
            distillation_loss=losses.distillation_loss if losses else None,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )


__all__ = [
    "DeiTForImageClassification",
    "DeiTForImageClassificationOutput",
    "DeiTForImageClassificationWithTeacher",
    "DeiTForImageClassificationWithTeacherOutput",
    "DeiTModel",
    "DeiTPreTrainedModel",
]
