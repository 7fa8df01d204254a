"""How the flags of a run go together: every rule that relates two of them, in one place.

Each argument dataclass refuses a value outside its own field's range as `HfArgumentParser` builds it (`training.args`,
`training.data_args`); everything else is here: settings each dataclass accepts alone but that would not train
together, flags the run would not read, what a flag given settles over the recipe or a checkpoint, and the commands'
own rules (`training.train_teacher`, `training.record_teacher`). Each refusal is a `ValueError` in one line naming the
option; the commands turn it into argparse's usage error (`training.train.parse_args`).
"""

import importlib.util
import logging
import os

import timm
from transformers import TrainingArguments

from deit_hf import DeiTConfig
from deit_hf.distillation_types import TEACHER_TYPES, get_distillation_type

from .args import DistillationArguments, ModelArguments, RunArguments
from .data_args import OFF_VALUES, AugmentationArguments, DataArguments

logger = logging.getLogger(__name__)

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
# A flag of the recipe's rule and the TrainingArguments value it derives: the one the user gave wins.
RECIPE_RULES = (("blr", "learning_rate"), ("warmup_epochs", "warmup_steps"))
# Augmentations that make soft targets, which a classifier's own loss (`training.train_teacher`) does not read.
SOFT_TARGET_FLAGS = ("mixup", "cutmix", "smoothing")


def settle_run_arguments(arguments: RunArguments, given: set[str]) -> None:
    """Refuse what the flags of a training run would not train together, and apply what the user gave explicitly
    (`given`: the flags named) over what the recipe or a checkpoint would decide.

    An explicit `--learning_rate` or `--warmup_steps` turns the recipe's rule that would derive it off (`--blr`,
    `--warmup_epochs` set to 0); giving both of a pair is refused. Evaluation only (`--do_train false`) with no
    teacher flag distils nothing. A checkpoint to fine-tune gives the architecture and, unless `--input_size` says
    another, the input size."""
    model, distillation, data = arguments.model, arguments.distillation, arguments.data
    augmentation, training = arguments.augmentation, arguments.training
    check_model_source(model)
    check_teacher_is_named(distillation)
    check_data_source(data)
    for rule, derived in RECIPE_RULES:
        if rule in given and derived in given:
            raise ValueError(f"--{rule} and --{derived} both set the {derived.replace('_', ' ')}: give one of them.")
        if derived in given:
            setattr(distillation, rule, 0)  # 0 turns the rule off and keeps the value given
    keep_no_idle_workers(training)
    if not training.do_train and not given & {"teacher_model", "teacher_checkpoint", "distillation_type"}:
        distillation.distillation_type = "none"  # evaluation only: the paper's default teacher is for training
    if "label_smoothing_factor" in given:
        raise ValueError("--label_smoothing_factor is not read by DistillationTrainer: use --smoothing (it smooths "
                         "the class targets, Mixup's soft targets included).")
    check_stream_dispatch(data, training)
    if data.streaming and "mix_group_size" in given:
        raise ValueError("--mix_group_size is read for a dataset of known length: a --streaming run mixes each "
                         "micro-batch whole.")
    check_cache_flags(given, distillation, data)
    check_distillation_flags_are_read(given, distillation)
    check_optimizer_flags(given, training)
    if model.model_name_or_path is not None:
        if "model_preset" in given:
            raise ValueError("--model_preset and --model_name_or_path both describe the student: the checkpoint's "
                             "architecture is used, drop one of them.")
        check_checkpoint_arguments(model, augmentation, "input_size" in given)
    check_settings_train_together(model, distillation, augmentation, training)


def check_model_source(model_args: ModelArguments) -> None:
    """`--config_overrides` changes a preset only, and each of its fields must be one of the preset's, of its type
    (refused now, not after loading the data)."""
    if model_args.model_name_or_path is not None and model_args.config_overrides:
        raise ValueError(
            "--config_overrides changes a --model_preset; a --model_name_or_path checkpoint keeps its own "
            "configuration."
        )
    model_args.config_overrides_dict()


def check_teacher_is_named(distill_args: DistillationArguments) -> None:
    """A distillation type that uses a teacher needs one named, and only such a type has a teacher to record."""
    uses_teacher = get_distillation_type(distill_args.distillation_type).uses_teacher
    if distill_args.teacher_cache is not None and not uses_teacher:
        raise ValueError(f"--teacher_cache with --distillation_type {distill_args.distillation_type}: there is no "
                         "teacher to record.")
    if uses_teacher and (distill_args.teacher_model or "").strip().lower() in OFF_VALUES:
        raise ValueError(
            f"--distillation_type {distill_args.distillation_type} needs a teacher but --teacher_model is "
            f"{distill_args.teacher_model!r}: name a timm model or a local Hugging Face classifier, or pass "
            "--distillation_type none or labels."
        )


def check_data_source(data_args: DataArguments) -> None:
    """The images come from one of `--dataset_name` or `--train_dir`, and `--validation_dir` goes with the latter."""
    if (data_args.dataset_name is None) == (data_args.train_dir is None):
        raise ValueError("Pass exactly one of `dataset_name` or `train_dir`.")
    if data_args.validation_dir is not None and data_args.train_dir is None:
        raise ValueError("`validation_dir` needs `train_dir`; a `dataset_name` dataset has its own splits.")


def keep_no_idle_workers(training_args: TrainingArguments) -> None:
    """Without DataLoader workers there are none to keep alive between epochs (torch refuses the pair)."""
    if training_args.dataloader_num_workers == 0:
        training_args.dataloader_persistent_workers = False


def check_settings_train_together(
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


# TrainingArguments options whose parsing builds an integration's config, which transformers registers globally before
# it checks that the package is installed (an ImportError, and a half-built DeepSpeed config every later model sees).
INTEGRATION_PACKAGES = {"deepspeed": "deepspeed"}


def check_integrations_installed(given: set[str]) -> None:
    """Refuse, before the arguments are parsed, an option whose integration package is not installed."""
    for flag, package in INTEGRATION_PACKAGES.items():
        if flag in given and importlib.util.find_spec(package) is None:
            raise ValueError(f"--{flag} needs the {package} package, which is not installed (pip install {package}).")


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


def check_stream_dispatch(data_args: DataArguments, training_args: TrainingArguments) -> None:
    """Refuse accelerate's `dispatch_batches` settings that would lose or repeat streamed examples on N processes."""
    if not data_args.streaming or training_args.world_size == 1:
        return
    dispatch = training_args.accelerator_config.dispatch_batches
    # The evaluation stream stays with accelerate's dispatching (process 0 reads it, and `gather_for_metrics` drops
    # the padding of its last batch); undispatched, accelerate would give the processes unequal or overlapping parts.
    evaluates = training_args.do_eval or training_args.eval_strategy != "no"
    if dispatch is False and evaluates:
        raise ValueError(
            "--accelerator_config dispatch_batches=false with --streaming on several processes: the evaluation stream "
            "would count some examples twice or not at all. Leave dispatch_batches unset (the train stream is split "
            "among the processes anyway), or do not evaluate (--eval_strategy no --do_eval false)."
        )
    # A dispatched train batch is split evenly with the remainder dropped (accelerate's `DataLoaderDispatcher`): once
    # an image fails to decode, the global batch no longer divides among the processes and decoded images are lost.
    if dispatch:
        raise ValueError(
            "--accelerator_config dispatch_batches=true with --streaming on several processes: accelerate splits each "
            "dispatched train batch evenly and drops the remainder, so every batch with an undecodable image would "
            "lose decoded ones without a word. Leave dispatch_batches unset: each process reads and decodes its own "
            "part of the train stream."
        )


def check_cache_flags(given: set[str], distill_args, data_args) -> None:
    """Refuse `--teacher_cache*` flags that would not be read. With `--teacher_cache` and no flag naming the teacher,
    `teacher_model` becomes None: the record's teacher (`training.teacher.identity.resolve_teacher`)."""
    if distill_args.teacher_cache is None:
        if unread := sorted({"teacher_cache_top_k", "teacher_cache_check"} & given):
            raise ValueError(f"--{unread[0]} is read with --teacher_cache only.")
        return
    if not given & set(TEACHER_IDENTITY_FLAGS):
        distill_args.teacher_model = None
    keeps_logits = get_distillation_type(distill_args.distillation_type).uses_teacher_distribution
    if "teacher_cache_top_k" in given and not keeps_logits:
        raise ValueError("--teacher_cache_top_k is for soft distillation; hard records the teacher's class only.")
    if data_args.streaming:
        raise ValueError("--teacher_cache needs a dataset of known length and order: it cannot record a --streaming "
                         "one.")


def check_checkpoint_arguments(model_args: ModelArguments, aug_args: AugmentationArguments, input_size_given: bool):
    """Settle the flags a checkpoint to fine-tune decides: its architecture (`--distillation_token` may only repeat
    it) and the input size (its own unless `--input_size` is given: a multiple of its patch, downsampling warned)."""
    try:
        config = DeiTConfig.from_pretrained(model_args.model_name_or_path)
    except OSError as error:
        raise ValueError(f"--model_name_or_path {model_args.model_name_or_path}: {error}") from error
    height, width = config.image_size if isinstance(config.image_size, (list, tuple)) else (config.image_size,) * 2
    if height != width:
        raise ValueError(f"The checkpoint takes {height}x{width} images; training supports square inputs only.")
    _check_distillation_token(model_args, config)
    patch = config.patch_size if isinstance(config.patch_size, int) else config.patch_size[0]
    if not input_size_given:
        aug_args.input_size = height
    elif aug_args.input_size % patch:
        raise ValueError(f"--input_size {aug_args.input_size} is not a multiple of the checkpoint's patch size "
                         f"{patch} ({model_args.model_name_or_path} takes {height}x{width} images).")
    elif aug_args.input_size < height:
        logger.warning("--input_size %d is below the %d px the checkpoint was trained at: its position embeddings are "
                       "downsampled.", aug_args.input_size, height)


def _check_distillation_token(model_args: ModelArguments, config: DeiTConfig) -> None:
    """A checkpoint keeps its architecture: `--distillation_token` may only say what it already is."""
    given, stored = model_args.distillation_token, config.use_distillation_token
    if given is False and stored:
        heads = (config.architectures or [])[:1] == ["DeiTForImageClassificationWithTeacher"]
        extra = "deit.embeddings.distillation_token" + (", distillation_classifier.weight and .bias" if heads else "")
        raise ValueError(f"--distillation_token false but {model_args.model_name_or_path} has a distillation token "
                         f"({extra}), which a model without one would drop: drop --distillation_token, or train a "
                         "preset with --distillation_token false.")
    if given is True and not stored:
        raise ValueError(f"--distillation_token true but {model_args.model_name_or_path} has none (a DeiT without "
                         "distillation token): drop --distillation_token.")
    model_args.distillation_token = stored


def check_recording_arguments(arguments: RunArguments) -> None:
    """`training.record_teacher` records a teacher's targets into `--teacher_cache`, which it needs; it checks none."""
    if arguments.distillation.teacher_cache is None:
        raise ValueError("training.record_teacher needs --teacher_cache DIR: where to record the teacher's targets.")
    if arguments.distillation.teacher_cache_check:
        raise ValueError("training.record_teacher records: --teacher_cache_check is read by a training run that "
                         "replays the record (python -m training.train).")


def settle_teacher_training_arguments(teacher_args, data_args: DataArguments, aug_args: AugmentationArguments,
                                      training_args: TrainingArguments) -> None:
    """Refuse what `training.train_teacher` would not read: starting weights for a classifier that carries its own,
    two sources of them, soft targets (the classifier's own loss takes class ids) and the student's `--model_ema`."""
    if not timm.is_model(teacher_args.teacher_model) and (teacher_args.pretrained or teacher_args.teacher_checkpoint):
        raise ValueError(f"--pretrained and --teacher_checkpoint are for timm models; {teacher_args.teacher_model!r} "
                         "is not one (a Hugging Face classifier carries its own weights).")
    if teacher_args.pretrained and teacher_args.teacher_checkpoint:
        raise ValueError("--pretrained and --teacher_checkpoint both give the starting weights: give one.")
    check_data_source(data_args)
    soft = [name for name in SOFT_TARGET_FLAGS if getattr(aug_args, name) > 0]
    if soft:
        raise ValueError(f"--{soft[0]} makes soft targets, which the classifier's own loss does not read.")
    if training_args.model_ema:
        raise ValueError("--model_ema is training.train's (the student's weights' average), not the teacher's.")
    keep_no_idle_workers(training_args)
