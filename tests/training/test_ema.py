"""`--model_ema`: the weights' exponential moving average, saved beside the model and evaluated beside it."""

import json

import pytest
import torch
from safetensors.torch import load_file

from training.train import main, parse_args

from .conftest import tiny_run_args

STEPS = ["--max_steps", "2", "--eval_strategy", "no", "--do_eval", "true", "--learning_rate", "1e-2",
         "--warmup_steps", "0"]


@pytest.mark.parametrize("decay", [0.0, 1.0])
def test_the_average_is_saved_and_evaluated_beside_the_model(decay, small_digits_dir, random_teacher_dir, tmp_path):
    torch.manual_seed(0)
    initial = {name: tensor.clone() for name, tensor in main(tiny_run_args(
        small_digits_dir, random_teacher_dir, tmp_path / "untrained", "--max_steps", "1", "--learning_rate", "1e-12",
        "--eval_strategy", "no", "--do_eval", "false")).model.state_dict().items()}
    output = tmp_path / "run"
    main(tiny_run_args(small_digits_dir, random_teacher_dir, output, *STEPS, "--model_ema", "true",
                       "--model_ema_decay", str(decay)))
    trained, average = (load_file(folder / "model.safetensors") for folder in (output, output / "ema"))
    reference = trained if decay == 0 else initial  # decay 0: the last weights; 1: the first ones, never updated
    name = "deit.embeddings.cls_token"
    assert not torch.equal(trained[name], initial[name])  # the run did move the weights
    torch.testing.assert_close(average[name], reference[name].cpu(), rtol=0, atol=1e-6 if decay == 0 else 1e-5)
    metrics = json.loads((output / "all_results.json").read_text())
    assert "eval_ema_top1" in metrics and (decay != 0 or metrics["eval_ema_top1"] == metrics["eval_top1"])
    assert (output / "ema" / "preprocessor_config.json").is_file()


@pytest.mark.parametrize("flags, message", [
    (["--model_ema_decay", "1.5"], "--model_ema_decay must be in"),
    (["--resume_from_checkpoint", "last"], "--model_ema with --resume_from_checkpoint"),
])
def test_ema_settings_that_would_not_work_are_refused(flags, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--dataset_name", "x", "--model_ema", "true", *flags])
    assert message in capsys.readouterr().err
