"""Train DeiT⚗ with a teacher on an image dataset loaded with `datasets`.

    python -m training.train --dataset_name ILSVRC/imagenet-1k --teacher_model regnety_160.deit_in1k \
        --output_dir outputs/deit-s
    accelerate launch --multi_gpu --num_processes 8 -m training.train args.json

Arguments are the dataclasses of `training.args` plus transformers' `TrainingArguments`, as flags or one JSON file.
Their defaults are the DeiT recipe (facebookresearch/deit `main.py`); see `--help`.
"""

import sys

from . import cli_options

if __name__ == "__main__":  # --help and argparse's refusals before torch and transformers load (seconds)
    cli_options.answer_early(sys.argv[1:])

import argparse
import json
import logging
import math
import os
from collections.abc import Callable

import torch
import transformers
import yaml
from accelerate.utils import get_int_from_env
from transformers import HfArgumentParser, TrainerCallback, TrainingArguments

from deit_hf import DeiTHfImageProcessorPil, DeiTPreTrainedModel
from deit_hf.distillation_types import get_distillation_type

from .args import (
    AugmentationArguments,
    DataArguments,
    DeiTTrainingArguments,
    DistillationArguments,
    ModelArguments,
)
from .argument_checks import check_arguments, check_distillation_flags_are_read, check_optimizer_flags
from .checkpoints import resume_argument
from .collator import DistillationCollator
from .command_line import run_command, set_up_logging
from .data import attach_transform, load_image_datasets, prepare_train_stream
from .ema import WeightAverage
from .memory_check import check_activation_memory
from .metrics import compute_metrics, preprocess_logits_for_metrics
from .preemption import Preemption
from .run_card import write_run_card
from .skipped_images import SkippedImageCounter
from .student import build_student, check_checkpoint_arguments
from .teacher.model import check_class_names, input_size_hint, load_teacher
from .teacher.preflight import preflight
from .teacher.targets import check_cache_flags, open_teacher_targets
from .trainer import DistillationTrainer
from .transforms import ImageTransform, build_batch_transform, build_eval_transform, build_train_transform

logger = logging.getLogger(__spec__.name)  # under `python -m`, "training.train" rather than "__main__"

# The recipe's TrainingArguments (facebookresearch/deit main.py); the learning rate and warm-up are derived below.
RECIPE_TRAINING_DEFAULTS = dict(
    output_dir="outputs/deit",
    do_train=True,
    num_train_epochs=300,
    per_device_train_batch_size=128,
    per_device_eval_batch_size=128,
    weight_decay=0.05,
    adam_epsilon=1e-8,
    max_grad_norm=0.0,  # facebookresearch/deit does not clip gradients (its --clip-grad defaults to None)
    lr_scheduler_type="cosine_with_min_lr",
    lr_scheduler_kwargs={"min_lr": 1e-5},
    eval_strategy="epoch",
    save_strategy="epoch",
    save_total_limit=2,
    logging_steps=50,
    # transformers' NaN/inf filter reads each step's loss on the host, a synchronization per step; without it a
    # non-finite loss shows in the logged mean instead of being replaced.
    logging_nan_inf_filter=False,
    ddp_find_unused_parameters=False,  # every parameter gets a gradient (both heads, with or without a teacher)
    report_to=["tensorboard"],
    remove_unused_columns=False,  # the image transform needs the raw columns
    dataloader_num_workers=8,
    # Workers live across epochs, as timm's loader keeps them: where workers are spawned (macOS, Windows, a spawned
    # parent, Python 3.14's forkserver), each new one imports torch and the data stack again.
    dataloader_persistent_workers=True,
    # How long a process waits at a collective for a stuck one before the job fails (transformers: 30 min). It must
    # exceed the longest legitimate wait: another process compiling its first step or the main one writing a
    # checkpoint, minutes at most. The launcher adds its 30 s grace before it kills the stuck process.
    ddp_timeout=600,
)
ARGUMENT_CLASSES = (ModelArguments, DistillationArguments, DataArguments, AugmentationArguments, DeiTTrainingArguments)


# A flag of the recipe's rule and the TrainingArguments value it derives: the one the user gave wins.
RECIPE_RULES = (("blr", "learning_rate"), ("warmup_epochs", "warmup_steps"))
# An interval given alone switches its strategy from the recipe's "epoch" to "steps", as transformers' default does.
STEP_INTERVALS = (("save_steps", "save_strategy"), ("eval_steps", "eval_strategy"))


CONFIG_FILE_SUFFIXES = (".json", ".yaml", ".yml")


def _read_config_file(path: str) -> dict:
    with open(path) as file:
        values = json.load(file) if path.endswith(".json") else yaml.safe_load(file)
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of argument names to values, got {type(values).__name__}.")
    return values


def parse_args(argv: list[str] | None = None):
    """The five argument dataclasses from flags, or from a `.json`/`.yaml` file followed by flags that override it.

    An explicit `--learning_rate` or `--warmup_steps` replaces the recipe's rule that would derive it (`--blr`,
    `--warmup_epochs`); giving both of a pair is refused. `--save_steps` or `--eval_steps` without its strategy
    means `steps`, as in transformers. A checkpoint to fine-tune (`--model_name_or_path`) gives the architecture
    and, unless `--input_size` says another, the input size. A value that an argument dataclass, a conflict
    between arguments or `training.argument_checks.check_arguments` refuses exits as argparse does (status 2), with one
    line naming the option.
    """
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    cli_options.save(parser)
    given = set()
    if argv and argv[0].endswith(CONFIG_FILE_SUFFIXES):
        try:
            file_values = _read_config_file(argv[0])
        except (OSError, ValueError, yaml.YAMLError) as error:
            parser.error(f"cannot read the config file {argv[0]}: {error}")
        unknown = sorted(set(file_values) - {action.dest for action in parser._actions})
        if unknown:
            parser.error(f"unknown arguments in {argv[0]}: {', '.join(unknown)}")
        parser.set_defaults(**file_values)
        given, argv = set(file_values), argv[1:]
    given |= {token[2:].split("=", 1)[0].replace("-", "_") for token in argv if token.startswith("--")}
    parser.set_defaults(**{strategy: "steps" for interval, strategy in STEP_INTERVALS
                           if interval in given and strategy not in given})
    try:
        arguments = parser.parse_args_into_dataclasses(argv)
        _resolve_given(given, *arguments)
        model_args, distill_args, _, aug_args, training_args = arguments
        check_arguments(model_args, distill_args, aug_args, training_args)
    except ValueError as error:  # a dataclass's own check, a conflict between arguments, a value refused
        parser.error(str(error))
    return arguments


def build_parser() -> HfArgumentParser:
    """The command line's parser, with the recipe's defaults."""
    # A short usage line: argparse prints it above each error, and the full one runs to 9 kB.
    parser = HfArgumentParser(ARGUMENT_CLASSES, usage="%(prog)s [--option value ...] | ARGS.json (options: --help)")
    # Without an accelerator, `accelerate launch` forms a gloo group only for CPU runs; otherwise every process
    # would train alone on all the data.
    has_accelerator = torch.accelerator.is_available()
    parser.set_defaults(**RECIPE_TRAINING_DEFAULTS, use_cpu=not has_accelerator, dataloader_pin_memory=has_accelerator)
    _show_what_decides(parser)
    return parser


def _show_what_decides(parser: HfArgumentParser) -> None:
    """`--help` as the run reads it: a flag that a recipe rule derives says so, a refused one is not listed."""
    actions = {action.dest: action for action in parser._actions}
    for rule, derived in RECIPE_RULES:
        actions[derived].help = (f"Default: derived from --{rule} (see there). A value given replaces that rule; with "
                                 f"--{rule} 0 and none given: %(default)s.")
    actions["label_smoothing_factor"].help = argparse.SUPPRESS  # refused: --smoothing is the recipe's


def _resolve_given(given: set[str], model_args, distill_args, data_args, aug_args, training_args) -> None:
    """Apply what the user gave explicitly over what the recipe or a checkpoint would decide."""
    for rule, derived in RECIPE_RULES:
        if rule in given and derived in given:
            raise ValueError(f"--{rule} and --{derived} both set the {derived.replace('_', ' ')}: give one of them.")
        if derived in given:
            setattr(distill_args, rule, 0)  # 0 turns the rule off and keeps the value given
    if training_args.dataloader_num_workers == 0:
        training_args.dataloader_persistent_workers = False  # no workers to keep (torch refuses the pair)
    if not training_args.do_train and not given & {"teacher_model", "teacher_checkpoint", "distillation_type"}:
        distill_args.distillation_type = "none"  # evaluation only: the paper's default teacher is for training
    if "label_smoothing_factor" in given:
        raise ValueError("--label_smoothing_factor is not read by DistillationTrainer: use --smoothing (it smooths "
                         "the class targets, Mixup's soft targets included).")
    check_stream_dispatch(data_args, training_args)
    if data_args.streaming and "mix_group_size" in given:
        raise ValueError("--mix_group_size is read for a dataset of known length: a --streaming run mixes each "
                         "micro-batch whole.")
    check_cache_flags(given, distill_args, data_args)
    check_distillation_flags_are_read(given, distill_args)
    check_optimizer_flags(given, training_args)
    if model_args.model_name_or_path is None:
        return
    if "model_preset" in given:  # (--config_overrides with a checkpoint: ModelArguments refuses it)
        raise ValueError("--model_preset and --model_name_or_path both describe the student: the checkpoint's "
                         "architecture is used, drop one of them.")
    check_checkpoint_arguments(model_args, aug_args, "input_size" in given)


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


def apply_recipe_schedule(
    training_args: TrainingArguments, distill_args: DistillationArguments, train_size: int | None
):
    """DeiT's linear scaling rule (lr = blr x global batch / 512) and warm-up counted in epochs, then checks of the
    schedule that results; the values used are logged."""
    global_batch = (
        training_args.per_device_train_batch_size * training_args.world_size * training_args.gradient_accumulation_steps
    )
    steps_per_epoch = None if train_size is None else math.ceil(train_size / global_batch)
    if distill_args.blr > 0:
        training_args.learning_rate = distill_args.blr * global_batch / 512
    if distill_args.warmup_epochs > 0:
        if steps_per_epoch is None:
            logger.warning("A streamed dataset has no length: warm-up in epochs is off, use --warmup_steps.")
        else:
            training_args.warmup_steps = int(distill_args.warmup_epochs * steps_per_epoch)
    min_lr = (training_args.lr_scheduler_kwargs or {}).get("min_lr")
    if min_lr is not None and min_lr >= training_args.learning_rate:
        # The cosine would climb from the learning rate up to its floor instead of decaying.
        logger.warning(
            "The learning rate %.3g is not above the cosine's min_lr %.3g: the cosine decays to 0 instead.",
            training_args.learning_rate, min_lr,
        )
        training_args.lr_scheduler_kwargs = {**training_args.lr_scheduler_kwargs, "min_lr": 0.0}
    total_steps = (
        training_args.max_steps if training_args.max_steps > 0
        else None if steps_per_epoch is None else math.ceil(training_args.num_train_epochs * steps_per_epoch)
    )
    warmup_steps = training_args.get_warmup_steps(total_steps or 0)
    if total_steps is not None and warmup_steps >= total_steps:
        logger.warning(
            "Warm-up (%d steps) is as long as the whole run (%d steps): the learning rate never reaches %.3g.",
            warmup_steps, total_steps, training_args.learning_rate,
        )
    logger.info(
        "Global batch %d: learning rate %.3g, %d warm-up steps, %s steps in all.",
        global_batch, training_args.learning_rate, warmup_steps, total_steps if total_steps is not None else "unknown",
    )


def share_cpu_threads(dataloader_num_workers: int) -> int:
    """Give this process's intra-op pool the cores left to it by the other local processes and its DataLoader
    workers (each runs one thread), so none of them spins against another; `OMP_NUM_THREADS` set by the user (or
    by `accelerate launch`) wins. Returns the thread count."""
    if "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    # torchrun's count, else mpirun's (accelerate's MULTI_CPU launch), which accelerate copies only later
    local_processes = get_int_from_env(
        ["LOCAL_WORLD_SIZE", "MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "MV2_COMM_WORLD_LOCAL_SIZE"], 1
    )
    threads = max(1, cores // local_processes - dataloader_num_workers)
    torch.set_num_threads(threads)
    return threads


def prepare_datasets(data_args: DataArguments, aug_args: AugmentationArguments, training_args: TrainingArguments):
    """The run's `ImageDatasets`, its train and validation splits with their image transforms attached, and whether
    the train split is this process's own part of a stream (`check_stream_dispatch`)."""
    data = load_image_datasets(data_args)
    train_dataset, eval_dataset = data.dataset_dict["train"], data.dataset_dict["validation"]
    own_stream_part = data_args.streaming and training_args.world_size > 1
    if data_args.streaming:  # before the transform: each process decodes only its own examples
        train_dataset = prepare_train_stream(
            train_dataset, data_args, training_args.process_index, training_args.world_size,
            training_args.dataloader_num_workers, training_args.seed, own_stream_part,
        )
    bounds = dict(max_pixels=data_args.max_image_pixels, max_aspect_ratio=data_args.max_image_aspect_ratio)
    train_dataset = attach_transform(
        train_dataset, ImageTransform(build_train_transform(aug_args), data.image_column, data.label_column, **bounds)
    )
    eval_dataset = attach_transform(
        eval_dataset, ImageTransform(build_eval_transform(aug_args), data.image_column, data.label_column, **bounds)
    )
    return data, train_dataset, eval_dataset, own_stream_part


def build_trainer(
    argv: list[str] | None = None,
    callbacks: list[TrainerCallback] | None = None,
    prepare_model: Callable[[DeiTPreTrainedModel], torch.nn.Module] | None = None,
):
    """The run's `DistillationTrainer`, ready to train, and its five argument dataclasses: data, student, teacher
    (or its recorded targets, `--teacher_cache`) and the schedule, as `argv` says; the teacher checked."""
    model_args, distill_args, data_args, aug_args, training_args = parse_args(argv)
    set_up_logging(training_args)
    transformers.set_seed(training_args.seed)
    logger.info("%d torch threads per process.", share_cpu_threads(training_args.dataloader_num_workers))

    data, train_dataset, eval_dataset, own_stream_part = prepare_datasets(data_args, aug_args, training_args)
    model = build_student(model_args, distill_args, aug_args, data.id2label)
    check_activation_memory(model.config, training_args)
    if prepare_model is not None:
        model = prepare_model(model)
    processor = DeiTHfImageProcessorPil.for_input_size(aug_args.input_size, aug_args.eval_crop_pct)
    mean, std = processor.image_mean, processor.image_std

    def load_checked_teacher():
        teacher = load_teacher(
            distill_args.teacher_model, distill_args.teacher_checkpoint, num_labels=len(data.label_names),
            student_mean=mean, student_std=std, teacher_mean=distill_args.teacher_mean,
            teacher_std=distill_args.teacher_std, student_size=(aug_args.input_size, aug_args.input_size),
            input_size=distill_args.teacher_input_size,
        )
        check_class_names(teacher, data.label_names)
        return teacher

    teacher_targets = None
    if get_distillation_type(distill_args.distillation_type).uses_teacher:  # the teacher, or its recorded targets
        teacher_targets = open_teacher_targets(
            distill_args, aug_args, training_args, data.dataset_dict, (mean, std), len(data.label_names),
            load_checked_teacher,
        )
    apply_recipe_schedule(training_args, distill_args, getattr(train_dataset, "num_rows", None))

    trainer = DistillationTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset if training_args.do_train else None,  # evaluation only: no --max_steps for a stream
        eval_dataset=eval_dataset,
        data_collator=DistillationCollator(),
        processing_class=processor,
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        teacher_targets=teacher_targets,
        batch_transform=build_batch_transform(aug_args, len(data.label_names), mean, std),
        num_repeats=aug_args.num_repeats if aug_args.repeated_aug else 0,
        mix_group_size=aug_args.mix_group(training_args.per_device_train_batch_size),
        skipped_images=SkippedImageCounter(data_args.min_decodable_fraction),
        max_consecutive_nonfinite=training_args.max_consecutive_nonfinite,
        own_stream_part=own_stream_part,
        callbacks=callbacks,
    )
    size_hint = input_size_hint(trainer.teacher, aug_args.input_size) if trainer.teacher is not None else None
    preflight(trainer, distill_args.teacher_check_batches, data.label_column, data.label_names, size_hint)
    return trainer, (model_args, distill_args, data_args, aug_args, training_args)


def main(
    argv: list[str] | None = None,
    callbacks: list[TrainerCallback] | None = None,
    prepare_model: Callable[[DeiTPreTrainedModel], torch.nn.Module] | None = None,
) -> DistillationTrainer:
    """Train as the command line `argv` says (default `sys.argv[1:]`); `callbacks` join the Trainer's own.

    `prepare_model` is given the student built from the flags (with the dataset's labels) and returns the model to
    train, e.g. a LoRA adapter around it: `lambda student: peft.get_peft_model(student, LoraConfig(...))`. The
    Trainer saves what that model saves (a PEFT model: its adapter); the run card is written for a whole DeiT only.

    On SIGTERM (`training.preemption`) training stops after the current step with a checkpoint there, and this exits
    with status 143 without saving a final model or evaluating.
    """
    preemption = Preemption()
    trainer, (model_args, distill_args, data_args, aug_args, training_args) = build_trainer(
        argv, [*(callbacks or []), preemption], prepare_model
    )
    ema = WeightAverage(training_args.model_ema_decay) if training_args.model_ema else None  # `training.ema`
    if ema is not None:
        trainer.add_callback(ema)
    model = trainer.model
    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=resume_argument(training_args, model.state_dict().keys()))
        if preemption.signal_number is not None:  # a checkpoint was saved at the last step: no final model
            trainer.end()
            sys.exit(128 + preemption.signal_number)  # as if the signal had ended the run, its work saved
        trainer.save_model()  # model + image processor: `pipeline("image-classification", output_dir)` loads it
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
    if training_args.do_eval:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    if ema is not None and training_args.do_train:
        ema_metrics = ema.save_and_evaluate(trainer, training_args.do_eval)
        if ema_metrics is not None:
            trainer.log_metrics("eval_ema", ema_metrics)
            trainer.save_metrics("eval_ema", ema_metrics)
    if training_args.do_train and isinstance(model, DeiTPreTrainedModel):
        # the saved model's README.md: this run's metrics per head, teacher and recipe
        write_run_card(trainer, model_args, distill_args, data_args, aug_args)
    elif training_args.do_train:
        logger.info("No run card: the trained model is a %s, not a DeiT (an adapter's save describes it).",
                    type(model).__name__)
    # Trackers finished, process group destroyed: a gloo group left to the interpreter's exit sometimes aborts it
    # ("terminate called without an active exception"), failing a finished run.
    trainer.end()
    return trainer


if __name__ == "__main__":
    run_command(main, "training.train")
