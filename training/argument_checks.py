"""Settings that each argument dataclass of `training.args` accepts alone but that would not train together."""

import os

from transformers import TrainingArguments

from deit_hf import DeiTConfig
from deit_hf.configuration_deit import TEACHER_DISTILLATION_TYPES

from .args import OFF_VALUES, AugmentationArguments, DistillationArguments, ModelArguments

# The flags that say which teacher, and so which targets: a `--teacher_cache` replay given none adopts the record's.
TEACHER_IDENTITY_FLAGS = ("teacher_model", "teacher_checkpoint", "teacher_mean", "teacher_std")
TEACHER_FLAGS = (*TEACHER_IDENTITY_FLAGS, "teacher_check_batches")


def check_arguments(
    model_args: ModelArguments,
    distill_args: DistillationArguments,
    aug_args: AugmentationArguments,
    training_args: TrainingArguments,
) -> None:
    """Refuse, naming the option, settings that each dataclass accepts alone but would not train (a `ValueError`).

    Run after the recipe's rules are resolved: `--blr 0` (or an explicit `--learning_rate`) keeps
    `--learning_rate`.
    """
    if distill_args.blr == 0 and training_args.learning_rate <= 0:
        raise ValueError(f"--learning_rate must be positive, got {training_args.learning_rate}: nothing would train.")
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if getattr(training_args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(training_args, name)}.")
    fsdp = training_args.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if fsdp and training_args.use_cpu:
        raise ValueError(
            "FSDP is asked for (--fsdp, or an accelerate config's FSDP section) but the run is on the CPU (--use_cpu), "
            "where accelerate drops FSDP and trains plain data parallel, each process holding the whole model. Train "
            "on accelerators, or drop FSDP to train on the CPU."
        )
    if training_args.weight_decay < 0:
        raise ValueError(f"--weight_decay must be >= 0, got {training_args.weight_decay}.")
    if training_args.do_train and training_args.max_steps <= 0 and training_args.num_train_epochs <= 0:
        raise ValueError(
            f"--num_train_epochs must be positive (or --max_steps given), got {training_args.num_train_epochs}."
        )
    if distill_args.distillation_type == "labels" and model_args.distillation_token is False:
        raise ValueError("--distillation_type labels trains the distillation token as a second class token, but the "
                         "student has none (--distillation_token false, or a one-head checkpoint): use "
                         "--distillation_type none.")
    if model_args.model_name_or_path is None:
        try:  # the preset with its overrides at the training resolution: a patch size that does not divide it, say
            DeiTConfig.from_preset(
                model_args.model_preset, image_size=aug_args.input_size, **model_args.config_overrides_dict()
            )
        except ValueError as error:
            raise ValueError(
                f"--model_preset {model_args.model_preset} with --config_overrides {model_args.config_overrides!r} at "
                f"--input_size {aug_args.input_size}: {error}"
            ) from None


def check_distillation_flags_are_read(given: set[str], distill_args: DistillationArguments) -> None:
    """Refuse a teacher, temperature or weight flag given by the user that the distillation type would not read."""
    kind = distill_args.distillation_type
    no_teacher_named = (distill_args.teacher_model or "").strip().lower() in OFF_VALUES  # `--teacher_model none`
    unread = [] if kind in TEACHER_DISTILLATION_TYPES else [
        flag for flag in TEACHER_FLAGS if flag in given and not (flag == "teacher_model" and no_teacher_named)
    ]
    unread += ["distillation_tau"] if kind != "soft" and "distillation_tau" in given else []
    unread += ["distillation_alpha"] if kind == "none" and "distillation_alpha" in given else []
    if unread:
        raise ValueError(f"--{unread[0]} is not read with --distillation_type {kind}: drop it, or choose the "
                         "distillation that uses it (a teacher: hard or soft; a temperature: soft).")
