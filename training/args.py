"""The training command's arguments, as `HfArgumentParser` dataclasses, and `RunArguments`: all of them, by name.

The student (`ModelArguments`), the teacher and its loss (`DistillationArguments`), the images (`DataArguments`,
`AugmentationArguments`: `training.data_args`) and transformers' `TrainingArguments` (`DeiTTrainingArguments`). Each
`__post_init__` refuses a value outside its own field's range, as `HfArgumentParser`'s dataclasses do (the parser
builds each one from the flags, so the refusal names the option as it is parsed); a rule that relates two flags is
`training.argument_checks`'.
"""

import os
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

import torch
from huggingface_hub.utils import HFValidationError, validate_repo_id
from transformers import TrainingArguments

from deit_hf import PRESETS, DeiTConfig
from deit_hf.distillation_types import DISTILLATION_TYPES

from .data_args import AugmentationArguments, DataArguments
from .step_guard import MAX_CONSECUTIVE_NONFINITE


@dataclass
class ModelArguments:
    """The student: a DeiT⚗ preset trained from scratch, or a checkpoint to fine-tune."""

    model_preset: str = field(
        default="deit-small-distilled-patch16-224",
        metadata={"help": f"A DeiT⚗ configuration from the paper: one of {sorted(PRESETS)}."},
    )
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A deit_hf or transformers DeiT checkpoint to start from instead of a preset."}
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "Preset fields to change, e.g. `hidden_size=64,num_hidden_layers=4,patch_size=4`."},
    )
    distillation_token: bool | None = field(
        default=None,
        metadata={"help": "Whether the student has a distillation token (DeiT⚗; default for a preset). false: the "
                  "paper's DeiT without one, its class head distilled by the teacher (classical distillation, with "
                  "--distillation_type hard or soft) or trained on the labels (none). A checkpoint keeps its own."},
    )
    drop_path_rate: float = field(default=0.1, metadata={"help": "Stochastic depth rate of the last block."})
    attn_implementation: str = field(
        default="sdpa", metadata={"help": "Attention kernel: `eager`, `sdpa`, `flash_attention_2`, `flex_attention`."}
    )

    def __post_init__(self):
        path = self.model_name_or_path
        if path is not None:
            if not path.strip():
                raise ValueError("--model_name_or_path is empty: name a checkpoint directory or a Hub model id.")
            if os.path.isdir(path):
                if not os.path.isfile(os.path.join(path, "config.json")):
                    raise ValueError(f"--model_name_or_path {path!r} holds no config.json: not a saved checkpoint.")
            elif is_meant_as_local_path(path):
                raise ValueError(f"--model_name_or_path {path!r}: no such directory.")
        elif self.model_preset not in PRESETS:
            raise ValueError(f"--model_preset {self.model_preset!r} is unknown; known presets: {sorted(PRESETS)}.")

    def config_overrides_dict(self) -> dict:
        """`config_overrides` parsed with the preset's own field types; a `ValueError` names a malformed field."""
        if not self.config_overrides:
            return {}
        config = DeiTConfig.from_preset(self.model_preset)
        overrides = {}
        for item in self.config_overrides.split(","):
            name, equals, value = (part.strip() for part in item.partition("="))
            if not (name and equals and value) or "=" in value:
                raise ValueError(f"--config_overrides: {item.strip()!r} is not field=value (comma-separated).")
            try:
                config.update_from_string(f"{name}={value}")  # the preset's type of the field
            except (ValueError, TypeError) as error:
                raise ValueError(f"--config_overrides: {name}={value}: {error}.") from None
            overrides[name] = getattr(config, name)
        return overrides


@dataclass
class DistillationArguments:
    """The teacher, the distillation loss and the recipe's learning-rate rule."""

    teacher_model: str | None = field(
        default="regnety_160.deit_in1k",
        metadata={"help": "A timm model name (the paper's teacher: `regnety_160.deit_in1k`, RegNetY-16GF, "
                  "82.9 %% top-1) "
                  "or a local directory of any Hugging Face image classifier. Evaluation only (--do_train false): no "
                  "teacher, and no teacher metrics, unless one is given."},
    )
    teacher_checkpoint: str | None = field(
        default=None,
        metadata={"help": "Weights for a timm teacher: a `.pth`/`.safetensors` state dict. Without it timm fetches "
                  "the model's pretrained weights."},
    )
    teacher_mean: list[float] | None = field(
        default=None,
        metadata={"help": "Per-channel mean the teacher was trained with (default: its image processor's, or timm's "
                  "pretrained_cfg for its architecture). Give with --teacher_std."},
    )
    teacher_std: list[float] | None = field(
        default=None, metadata={"help": "Per-channel std the teacher was trained with. Give with --teacher_mean."}
    )
    teacher_input_size: int | None = field(
        default=None,
        metadata={"help": "Resize the teacher's batches to this size (as its own preprocessing interpolates): a "
                  "teacher trained at another size than --input_size, e.g. when fine-tuning the student at a higher "
                  "resolution. Default: the student's size (a teacher that only takes its own gets that)."},
    )
    teacher_check_batches: int = field(
        default=8,
        metadata={"help": "Before training, the teacher is checked on validation images drawn from every class, as "
                  "many as this many evaluation batches hold; a teacher near chance, fed the wrong normalisation or "
                  "with classes swapped stops the run. Without a teacher, they must decode. 0 skips the check."},
    )
    teacher_cache: str | None = field(
        default=None,
        metadata={"help": "A directory recording the teacher's target for every augmented view (hard: its class; "
                  "soft: its top-k logits): recorded when it lacks this run's epochs, replayed without loading the "
                  "teacher when it holds them all. A record of another run (data, seed, augmentation, batch layout, "
                  "teacher, distillation type) is refused. Without a teacher flag, the record's teacher is used."},
    )
    teacher_cache_top_k: int = field(
        default=10, metadata={"help": "With --teacher_cache and soft distillation: the logits kept per view."}
    )
    teacher_cache_check: int = field(
        default=0,
        metadata={"help": "With a complete --teacher_cache: load the teacher and compare its targets with the "
                  "record's on this many random steps (nothing is recorded)."},
    )
    distillation_type: Literal[tuple(DISTILLATION_TYPES)] = field(
        default="hard",
        metadata={"help": "; ".join(f"{kind.name}: {kind.description}" for kind in DISTILLATION_TYPES.values())},
    )
    distillation_alpha: float = field(default=0.5, metadata={"help": "Weight of the distillation loss."})
    distillation_tau: float = field(default=1.0, metadata={"help": "Temperature of the soft distillation loss."})
    blr: float = field(
        default=5e-4,
        metadata={
            "help": "Learning rate per 512 images: lr = blr x global batch / 512. An explicit --learning_rate "
            "replaces it."
        },
    )
    warmup_epochs: float = field(
        default=5, metadata={"help": "Linear warm-up length in epochs. An explicit --warmup_steps replaces it."}
    )

    def __post_init__(self):
        if not 1 <= self.teacher_cache_top_k <= 32767 or self.teacher_cache_check < 0:
            raise ValueError(f"--teacher_cache_top_k must be in [1, 32767] and --teacher_cache_check >= 0, got "
                             f"{self.teacher_cache_top_k} and {self.teacher_cache_check}.")
        if self.teacher_input_size is not None and self.teacher_input_size < 1:
            raise ValueError(f"--teacher_input_size must be a positive size in pixels, got {self.teacher_input_size}.")
        for name in ("blr", "warmup_epochs", "teacher_check_batches"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}.")


def is_meant_as_local_path(name: str) -> bool:
    """Whether a name that is no directory cannot be a Hub id either, or starts in a local directory."""
    try:
        validate_repo_id(name)
    except HFValidationError:
        return True
    return os.path.exists(name) or os.path.isdir(name.split("/", 1)[0])


@dataclass
class DeiTTrainingArguments(TrainingArguments):
    """transformers' `TrainingArguments`, when to give up on non-finite steps (`training.step_guard`), and
    `ddp_timeout` applied to CPU (gloo) process groups too."""

    max_consecutive_nonfinite: int = field(
        default=MAX_CONSECUTIVE_NONFINITE,
        metadata={"help": "Stop the run (non-zero exit) after this many optimizer steps in a row with a non-finite "
                  "loss, teacher output or gradient; each is skipped, leaving the weights unchanged."},
    )
    model_ema: bool = field(
        default=False,
        metadata={"help": "Keep an exponential moving average of the weights (facebookresearch/deit's --model-ema), "
                  "saved to output_dir/ema and evaluated beside the model at the end (training.ema)."},
    )
    model_ema_decay: float = field(default=0.99996, metadata={"help": "The EMA's decay per optimizer step."})
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={"help": "`last`: continue from the newest complete, undamaged checkpoint of --output_dir (or start "
                  "from step 0 when there is none); or the path of a checkpoint folder to continue from."},
    )

    @cached_property
    def _setup_devices(self) -> torch.device:
        device = super()._setup_devices
        # transformers passes `ddp_timeout` to the process group for accelerators only: a CPU run would wait 30 min
        # for a stuck process whatever the flag says.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.set_timeout(self.ddp_timeout_delta)
        return device


@dataclass(frozen=True)
class RunArguments:
    """The parsed arguments of a training run (`training.train.parse_args`), each dataclass by its name."""

    model: ModelArguments
    distillation: DistillationArguments
    data: DataArguments
    augmentation: AugmentationArguments
    training: DeiTTrainingArguments
