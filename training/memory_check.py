"""Refuse, before the model runs, an input size whose activations cannot fit in memory: the kernel would kill the
process without a word (on the CPU), or the accelerator would fail deep in step 1.

The estimate is low on purpose, so that a run it refuses cannot fit (one it passes may still run out of memory). It
counts, per token, what a layer keeps for the backward when training (the residual stream, both norms' outputs, the
queries, keys and values, the attention's output and its projection: 9 x hidden size; the MLP's first layer and its
GELU: 2 x intermediate size) in every layer, and when evaluating one layer's residual stream and MLP activations. The
attention scores, batch x heads x tokens², are counted only where they are materialised, with eager attention (per
layer when training): sdpa's fused kernels hold them in blocks (at 512 px, a tiny DeiT's scores would be 2 GiB of the
0.5 GiB its training step took on the CPU).
"""

import logging

import psutil
import torch
from transformers import TrainingArguments

from deit_hf import DeiTConfig

logger = logging.getLogger(__name__)


def activation_bytes(config: DeiTConfig, batch_size: int, training: bool, bytes_per_value: int) -> int:
    """The low estimate of the module docstring for a batch of `batch_size` at `config.image_size`."""
    tokens = token_count(config)
    if training:
        per_token, layers = 9 * config.hidden_size + 2 * config.intermediate_size, config.num_hidden_layers
    else:
        per_token, layers = config.hidden_size + 2 * config.intermediate_size, 1
    scores = config.num_attention_heads * tokens ** 2 if config._attn_implementation == "eager" else 0
    return batch_size * layers * (tokens * per_token + scores) * bytes_per_value


def token_count(config: DeiTConfig) -> int:
    """The patches of an image at `config.image_size`, with the class and distillation tokens."""
    pair = lambda value: tuple(value) if isinstance(value, (list, tuple)) else (value, value)  # noqa: E731
    (height, width), (patch_height, patch_width) = pair(config.image_size), pair(config.patch_size)
    return (height // patch_height) * (width // patch_width) + 2


def available_memory(device: torch.device) -> int | None:
    """The bytes free for this process's activations: the accelerator's free memory, or the host's available memory
    for the CPU; None for another device (not checked)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        return psutil.virtual_memory().available
    return None


def check_activation_memory(config: DeiTConfig, training_args: TrainingArguments) -> None:
    """Refuse (`ValueError`, one line) a student whose training or evaluation batch's activations (`activation_bytes`)
    exceed the memory available on the run's device."""
    available = available_memory(training_args.device)
    if available is None:
        return
    bytes_per_value = 2 if training_args.bf16 or training_args.fp16 else 4
    batches = [(training_args.per_device_eval_batch_size, False, "an evaluation")]
    if training_args.do_train:
        batches.append((training_args.per_device_train_batch_size, True, "a training"))
    for batch_size, training, kind in batches:
        needed = activation_bytes(config, batch_size, training, bytes_per_value)
        if needed > available:
            raise ValueError(
                f"At {config.image_size} px ({token_count(config)} tokens of patch {config.patch_size}) the student's "
                f"activations for {kind} batch of {batch_size} need at least "
                f"{needed / 2 ** 30:.1f} GiB, and {training_args.device} has {available / 2 ** 30:.1f} GiB available. "
                "Lower --input_size or the batch size (--per_device_train_batch_size, --per_device_eval_batch_size)."
            )
