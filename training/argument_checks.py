"""Settings that each argument dataclass of `training.args` accepts alone but that would not train together."""

import os

from transformers import TrainingArguments

from deit_hf import DeiTConfig
from deit_hf.distillation_types import TEACHER_TYPES, get_distillation_type

from .args import OFF_VALUES, AugmentationArguments, DistillationArguments, ModelArguments

# What each optimiser transformers builds reads besides the learning rate and --weight_decay: whether it reads the
# --adam_* flags, and the --optim_args keys it reads (transformers' `trainer_optimizer` handlers). The weight decay of
# --optim_args is refused: the Trainer's parameter groups (none on norms, biases and tokens) would override it.
OPTIMIZER_READS = {
    "adamw_torch_fused": (True, ()),
    "adamw_torch": (True, ()),
    "sgd": (False, ("momentum", "dampening", "nesterov")),
    "adagrad": (False, ("lr_decay", "eps")),
    "rmsprop": (False, ("momentum", "alpha", "eps", "centered")),
}
ADAM_FLAGS = ("adam_beta1", "adam_beta2", "adam_epsilon")
# The flags that say which teacher, and so which targets: a `--teacher_cache` replay given none adopts the record's.
TEACHER_IDENTITY_FLAGS = ("teacher_model", "teacher_checkpoint", "teacher_mean", "teacher_std", "teacher_input_size")
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
    batch = training_args.per_device_train_batch_size
    if batch % (group := aug_args.mix_group(batch)):
        raise ValueError(f"--per_device_train_batch_size {batch} would split mix groups of {group} "
                         f"(--mix_group_size): make it a multiple of {group}, keeping the global batch with fewer "
                         "processes or more --gradient_accumulation_steps.")
    fsdp = training_args.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if fsdp and training_args.use_cpu:
        raise ValueError(
            "FSDP is asked for (--fsdp, or an accelerate config's FSDP section) but the run is on the CPU (--use_cpu), "
            "where accelerate drops FSDP and trains plain data parallel, each process holding the whole model. Train "
            "on accelerators, or drop FSDP to train on the CPU."
        )
    if training_args.model_ema and not 0 <= training_args.model_ema_decay <= 1:
        raise ValueError(f"--model_ema_decay must be in [0, 1], got {training_args.model_ema_decay}.")
    if training_args.model_ema and training_args.resume_from_checkpoint:
        raise ValueError("--model_ema with --resume_from_checkpoint: the checkpoints do not hold the weights' average, "
                         "which would restart from the resumed weights. Resume without --model_ema.")
    if training_args.weight_decay < 0:
        raise ValueError(f"--weight_decay must be >= 0, got {training_args.weight_decay}.")
    if training_args.do_train and training_args.max_steps <= 0 and training_args.num_train_epochs <= 0:
        raise ValueError(
            f"--num_train_epochs must be positive (or --max_steps given), got {training_args.num_train_epochs}."
        )
    kind = get_distillation_type(distill_args.distillation_type)
    if kind.needs_distillation_token and model_args.distillation_token is False:
        raise ValueError(f"--distillation_type {kind.name} trains the distillation token as a second class token, "
                         "but the student has none (--distillation_token false, or a one-head checkpoint): use "
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
    kind = get_distillation_type(distill_args.distillation_type)
    no_teacher_named = (distill_args.teacher_model or "").strip().lower() in OFF_VALUES  # `--teacher_model none`
    unread = [] if kind.uses_teacher else [
        flag for flag in TEACHER_FLAGS if flag in given and not (flag == "teacher_model" and no_teacher_named)
    ]
    unread += ["distillation_tau"] if not kind.uses_teacher_distribution and "distillation_tau" in given else []
    unread += ["distillation_alpha"] if not kind.weighs_two_parts and "distillation_alpha" in given else []
    if unread:
        raise ValueError(f"--{unread[0]} is not read with --distillation_type {kind.name}: drop it, or choose the "
                         f"distillation that uses it (a teacher: {' or '.join(TEACHER_TYPES)}; a temperature: soft).")


def check_optimizer_flags(given: set[str], training_args: TrainingArguments) -> None:
    """Refuse an optimiser the run does not build, and a flag of `--optim_args` or `--adam_*` it would not read."""
    optim = getattr(training_args.optim, "value", training_args.optim)
    if optim not in OPTIMIZER_READS:
        raise ValueError(f"--optim {optim} is not one training.train builds: choose one of {sorted(OPTIMIZER_READS)}.")
    reads_adam, keys = OPTIMIZER_READS[optim]
    unread = [] if reads_adam else [flag for flag in ADAM_FLAGS if flag in given]
    if unread:
        raise ValueError(f"--{unread[0]} is not read by --optim {optim}: drop it (its --optim_args: {', '.join(keys)})")
    arguments = training_args.optim_args or ""
    for item in filter(None, arguments.replace(" ", "").split(",")):
        key, equals, value = item.partition("=")
        if not (equals and value) or "=" in value:
            raise ValueError(f"--optim_args: {item!r} is not key=value (comma-separated).")
        if key not in keys:
            readable = f"it reads {', '.join(keys)}" if keys else "it reads none (use --adam_beta1/2, --adam_epsilon)"
            hint = "; the weight decay is --weight_decay" if key == "weight_decay" else ""
            raise ValueError(f"--optim_args {key}: not read by --optim {optim} ({readable}{hint}).")
