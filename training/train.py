"""Train DeiT⚗ with a teacher on an image dataset loaded with `datasets`.

    python -m training.train --dataset_name ILSVRC/imagenet-1k --teacher_model regnety_160.deit_in1k \
        --output_dir outputs/deit-s
    accelerate launch --multi_gpu --num_processes 8 -m training.train args.json

Arguments are the dataclasses of `training.args` plus transformers' `TrainingArguments`, as flags or one JSON file.
Their defaults are the DeiT recipe (facebookresearch/deit `main.py`); see `--help`. This module is the command line
(`parse_args`, `main`); `training.build` builds the run the arguments describe, `training.argument_checks` holds the
rules between flags.
"""

import sys

from . import cli_options

if __name__ == "__main__":  # --help and argparse's refusals before torch and transformers load (seconds)
    cli_options.answer_early(sys.argv[1:])

import argparse
import json
import logging
from collections.abc import Callable
from dataclasses import fields

import torch
import yaml
from transformers import HfArgumentParser, TrainerCallback

from deit_hf import DeiTPreTrainedModel

from .args import RunArguments
from .argument_checks import RECIPE_RULES, check_integrations_installed, settle_run_arguments
from .build import build_trainer
from .checkpoints import resume_argument
from .command_line import run_command
from .ema import WeightAverage
from .preemption import Preemption
from .run_card import write_run_card
from .trainer import DistillationTrainer

logger = logging.getLogger(__spec__.name)  # under `python -m`, "training.train" rather than "__main__"

# The recipe's TrainingArguments (facebookresearch/deit main.py); the learning rate and warm-up are derived from
# --blr and --warmup_epochs (`training.build.apply_recipe_schedule`).
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
# The dataclasses the parser fills, in the order of `RunArguments`' fields.
ARGUMENT_CLASSES = tuple(part.type for part in fields(RunArguments))
# An interval given alone switches its strategy from the recipe's "epoch" to "steps", as transformers' default does.
STEP_INTERVALS = (("save_steps", "save_strategy"), ("eval_steps", "eval_strategy"))


CONFIG_FILE_SUFFIXES = (".json", ".yaml", ".yml")


def _read_config_file(path: str) -> dict:
    with open(path) as file:
        values = json.load(file) if path.endswith(".json") else yaml.safe_load(file)
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of argument names to values, got {type(values).__name__}.")
    return values


def parse_args(argv: list[str] | None = None) -> RunArguments:
    """The run's arguments from flags, or from a `.json`/`.yaml` file followed by flags that override it.

    `--save_steps` or `--eval_steps` without its strategy means `steps`, as in transformers. What the flags given
    settle together, and what they may not be together, is `training.argument_checks.settle_run_arguments`'. A value
    that an argument dataclass or those rules refuse exits as argparse does (status 2), with one line naming the
    option.
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
        check_integrations_installed(given)
        arguments = RunArguments(*parser.parse_args_into_dataclasses(argv))
        settle_run_arguments(arguments, given)
    except (ValueError, OSError) as error:  # a dataclass's check, a conflict, a value refused, a file unreadable
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
    arguments = parse_args(argv)
    training_args = arguments.training
    preemption = Preemption()
    trainer = build_trainer(arguments, [*(callbacks or []), preemption], prepare_model)
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
        write_run_card(trainer, arguments.model, arguments.distillation, arguments.data, arguments.augmentation)
    elif training_args.do_train:
        logger.info("No run card: the trained model is a %s, not a DeiT (an adapter's save describes it).",
                    type(model).__name__)
    if training_args.push_to_hub and training_args.do_train:
        # transformers pushed at `save_model`, before evaluation; this push carries the metrics and the run card
        trainer.push_to_hub(commit_message="End of training: the run card")
    # Trackers finished, process group destroyed: a gloo group left to the interpreter's exit sometimes aborts it
    # ("terminate called without an active exception"), failing a finished run.
    trainer.end()
    return trainer


if __name__ == "__main__":
    run_command(main, "training.train")
