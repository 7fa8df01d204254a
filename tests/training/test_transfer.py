"""`training/configs/transfer.yaml`, facebookresearch/deit's transfer recipe, and the optimiser flags: each one honoured
by the optimiser built, or refused in one line."""

import re
from pathlib import Path

import pytest
import torch
from transformers import Trainer

from training import train
from training.build import apply_recipe_schedule
from training.train import main, parse_args

from .conftest import tiny_run_args

TRANSFER = Path(train.__file__).parent / "configs" / "transfer.yaml"


def test_the_transfer_recipe_is_the_authors():
    arguments = parse_args([str(TRANSFER), "--dataset_name", "x", "--per_device_train_batch_size", "768"])
    distill_args, aug_args, training_args = arguments.distillation, arguments.augmentation, arguments.training
    apply_recipe_schedule(training_args, distill_args, 768 * 10)
    optimizer, kwargs = Trainer.get_optimizer_cls_and_kwargs(training_args)
    assert optimizer is torch.optim.SGD and kwargs == {"lr": pytest.approx(0.01, rel=1e-4), "momentum": 0.9,
                                                       "nesterov": True}
    assert (training_args.weight_decay, aug_args.reprob, arguments.model.drop_path_rate) == (1e-4, 0.0, 0.0)
    assert distill_args.distillation_type == "hard" and distill_args.distillation_alpha == 0.5


def test_a_run_with_the_transfer_recipe_steps_with_nesterov_sgd(small_digits_dir, random_teacher_dir, tmp_path):
    trainer = main([str(TRANSFER), *tiny_run_args(small_digits_dir, random_teacher_dir, tmp_path, "--max_steps", "1",
                                                  "--eval_strategy", "no", "--do_eval", "false")])
    groups = trainer.optimizer.param_groups
    assert all(group["momentum"] == 0.9 and group["nesterov"] for group in groups)
    assert sorted(group["weight_decay"] for group in groups) == [0.0, 1e-4]  # none on norms, biases and tokens


@pytest.mark.parametrize("flags, message", [
    (["--adam_beta1", "0.8"], "--adam_beta1 is not read by --optim sgd"),
    (["--optim_args", "weight_decay=0.1"], "--optim_args weight_decay: not read by --optim sgd .*--weight_decay"),
    (["--optim_args", "momentum"], "--optim_args: 'momentum' is not key=value"),
    (["--optim", "adamw_torch_fused"], "--optim_args momentum: not read by --optim adamw_torch_fused"),
    (["--optim", "adafactor", "--optim_args", ""], "--optim adafactor is not one training.train builds"),
])
def test_an_optimiser_flag_that_would_not_be_read_is_refused(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args([str(TRANSFER), "--dataset_name", "x", *flags])
    assert exit_info.value.code == 2 and re.search(message, capsys.readouterr().err)


def test_the_authors_adamw_alternative_is_honoured():
    training_args = parse_args([str(TRANSFER), "--dataset_name", "x", "--optim", "adamw_torch_fused",
                                "--optim_args", "", "--adam_beta2", "0.99", "--weight_decay", "0.05"]).training
    optimizer, kwargs = Trainer.get_optimizer_cls_and_kwargs(training_args)
    assert optimizer is torch.optim.AdamW and kwargs["betas"] == (0.9, 0.99) and kwargs["fused"]
