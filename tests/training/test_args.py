"""Misconfiguration is refused while the arguments are parsed, in one line naming the option."""

import argparse
import json
import sys
import traceback
from pathlib import Path

import pytest

from deit_hf import DeiTConfig
from training import record_teacher, train_teacher
from training.student import build_student
from training.train import parse_args

REFUSED = [
    (["--learning_rate", "0"], "--learning_rate must be positive, got 0.0"),
    (["--blr", "0", "--learning_rate", "0"], "--blr and --learning_rate both set"),
    (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size must be >= 1, got 0"),
    (["--per_device_eval_batch_size", "0"], "--per_device_eval_batch_size must be >= 1, got 0"),
    (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be >= 1, got 0"),
    (["--blr=-5e-4"], "--blr must be >= 0, got -0.0005"),
    (["--warmup_epochs", "-1"], "--warmup_epochs must be >= 0, got -1.0"),
    (["--weight_decay", "-0.05"], "--weight_decay must be >= 0, got -0.05"),
    (["--num_train_epochs", "-3"], "--num_train_epochs must be positive (or --max_steps given), got -3.0"),
    (["--num_train_epochs", "0"], "--num_train_epochs must be positive"),
    (["--auto_augment", "rand-m9-mstd0.5-inc"], "--auto_augment 'rand-m9-mstd0.5-inc': timm would ignore ['inc']"),
    (["--auto_augment", "randaugment"], "--auto_augment 'randaugment' is not a policy timm can build (AssertionError"),
    (["--teacher_model", ""], "--distillation_type hard needs a teacher but --teacher_model is ''"),
    (["--teacher_model", " "], "--distillation_type hard needs a teacher but --teacher_model is ' '"),
    (["--distillation_type", "soft", "--teacher_model", "none"],
     "--distillation_type soft needs a teacher but --teacher_model is 'none'"),
    (["--distillation_token", "false", "--teacher_model", "none"],
     "--distillation_type hard needs a teacher but --teacher_model is 'none'"),
    (["--distillation_type", "labels", "--teacher_model", "none", "--distillation_token", "false"],
     "--distillation_type labels trains the distillation token as a second class token, but the student has none"),
    (["--distillation_type", "none", "--teacher_model", "resnet18"],
     "--teacher_model is not read with --distillation_type none: drop it"),
    (["--distillation_type", "labels", "--teacher_model", "none", "--teacher_checkpoint", "t.pth"],
     "--teacher_checkpoint is not read with --distillation_type labels"),
    (["--distillation_type", "none", "--teacher_check_batches", "2"],
     "--teacher_check_batches is not read with --distillation_type none"),
    (["--distillation_type", "hard", "--distillation_tau", "2"],
     "--distillation_tau is not read with --distillation_type hard"),
    (["--distillation_type", "none", "--distillation_alpha", "0.3"],
     "--distillation_alpha is not read with --distillation_type none"),
    (["--distillation_type", "labels", "--teacher_cache", "records"],
     "--teacher_cache with --distillation_type labels: there is no teacher to record"),
    (["--model_name_or_path", "/no/such/checkpoint"], "--model_name_or_path '/no/such/checkpoint': no such directory"),
    (["--model_name_or_path", "tests/no-such-run"], "--model_name_or_path 'tests/no-such-run': no such directory"),
    (["--model_name_or_path", "tests"], "--model_name_or_path 'tests' holds no config.json"),
    (["--model_name_or_path", ""], "--model_name_or_path is empty"),
    (["--model_preset", "deit-huge"], "--model_preset 'deit-huge' is unknown"),
    (["--config_overrides", "hidden_size64"], "--config_overrides: 'hidden_size64' is not field=value"),
    (["--config_overrides", "hidden_size=64,"], "--config_overrides: '' is not field=value"),
    (["--config_overrides", "hidden_size=6.4"], "--config_overrides: hidden_size=6.4: invalid literal for int()"),
    (["--config_overrides", "qkv_bias=maybe"], "--config_overrides: qkv_bias=maybe: can't derive true or false"),
    (["--config_overrides", "hiden_size=64"], "--config_overrides: hiden_size=64: key hiden_size isn't in the"),
    (["--config_overrides", "patch_size=5", "--input_size", "32"],
     "--config_overrides 'patch_size=5' at --input_size 32: `image_size` height (32) must be a positive multiple"),
    (["--min_decodable_fraction", "1.5"], "`min_decodable_fraction` must be in [0, 1], got 1.5"),
    (["--num_labels", "0"], "`num_labels` must be a positive number, got 0"),
    (["--max_image_aspect_ratio", "0.5"], "`max_image_aspect_ratio` (0.5) must be >= 1"),
    (["--teacher_check_batches", "-1"], "--teacher_check_batches must be >= 0, got -1"),
    (["--eval_crop_pct", "0.01"], "--eval_crop_pct 0.01 is out of range [0.5, 1] (DeiT: 0.875; 1 at 384 px): "
                                  "evaluation would resize to 22400 px and keep only the central 1% of each side"),
]


@pytest.mark.parametrize("flags, message", REFUSED, ids=[" ".join(flags) for flags, _ in REFUSED])
def test_misconfiguration_is_a_one_line_error_naming_the_option(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--dataset_name", "x", *flags])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    usage, line = error.splitlines()  # argparse's: a short usage line, then the error
    assert usage.startswith("usage: ") and ": error: " in line and message in line


def test_a_json_file_is_checked_the_same_way(tmp_path, capsys):
    path = tmp_path / "args.json"
    path.write_text(json.dumps({"dataset_name": "x", "per_device_train_batch_size": 0}))
    with pytest.raises(SystemExit):
        parse_args([str(path)])
    assert "--per_device_train_batch_size must be >= 1, got 0" in capsys.readouterr().err


def test_what_is_accepted():
    # --blr 0 turns the scaling rule off and keeps the (positive) default learning rate; 0 epochs with max_steps;
    # no teacher needed without distillation; a teacher name is checked only when there is distillation.
    for flags in (["--blr", "0"], ["--num_train_epochs", "0", "--max_steps", "10"],
                  ["--distillation_type", "none", "--teacher_model", ""],
                  ["--distillation_type", "labels", "--teacher_model", "none", "--distillation_alpha", "0.3"],
                  ["--distillation_type", "soft", "--distillation_tau", "3"],
                  ["--auto_augment", "augmix-m5-w4-d2"], ["--auto_augment", "rand-m9-n3-mstd1-tgeneral"],
                  ["--config_overrides", "hidden_size=64, num_attention_heads=4,qkv_bias=false"]):
        parse_args(["--dataset_name", "x", *flags])


def test_a_checkpoint_that_does_not_load_names_the_option(tmp_path):
    DeiTConfig.from_preset("deit-tiny-distilled-patch16-224").save_pretrained(tmp_path)  # a config, no weights
    arguments = parse_args(["--dataset_name", "x", "--model_name_or_path", str(tmp_path)])
    with pytest.raises(ValueError, match=rf"--model_name_or_path '{tmp_path}': .*model.safetensors"):
        build_student(arguments.model, arguments.distillation, arguments.augmentation, {0: "a", 1: "b"})


def test_help_shows_where_the_learning_rate_comes_from_and_hides_refused_flags(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help text
    learning_rate = "--learning_rate LEARNING_RATE, --learning-rate LEARNING_RATE"
    assert f"{learning_rate} Default: derived from --blr (see there)." in text
    assert "--warmup_steps WARMUP_STEPS, --warmup-steps WARMUP_STEPS Default: derived from --warmup_epochs" in text
    assert "(default: 5e-05)" not in text and "--label_smoothing_factor" not in text


@pytest.mark.parametrize("flags, environment", [(["--fsdp", "full_shard"], {}), ([], {"ACCELERATE_USE_FSDP": "true"})])
def test_fsdp_on_the_cpu_is_refused_rather_than_trained_as_plain_data_parallel(flags, environment, monkeypatch,
                                                                              capsys):
    for name, value in environment.items():  # what `accelerate launch` sets from an FSDP config
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit):
        parse_args(["--dataset_name", "x", "--use_cpu", "true", *flags])
    assert "FSDP is asked for (--fsdp, or an accelerate config's FSDP section) but the run is on the CPU" in (
        capsys.readouterr().err)


# Refusals that relate two flags, and the command that parses them ({checkpoint}: a saved DeiT config).
CROSS_FLAG_REFUSED = [
    (parse_args, ["--blr", "1", "--learning_rate", "1"], "--blr and --learning_rate both set"),
    (parse_args, ["--teacher_model", ""], "--distillation_type hard needs a teacher"),
    (parse_args, ["--distillation_type", "labels", "--teacher_cache", "r"], "--teacher_cache with --distillation_type"),
    (parse_args, ["--distillation_type", "none", "--teacher_model", "resnet18"], "--teacher_model is not read with"),
    (parse_args, ["--distillation_type", "labels", "--teacher_model", "none", "--distillation_token", "false"],
     "--distillation_type labels trains the distillation token"),
    (parse_args, ["--config_overrides", "patch_size=5", "--input_size", "32"], "--config_overrides 'patch_size=5' at"),
    (parse_args, ["--label_smoothing_factor", "0.1"], "--label_smoothing_factor is not read"),
    (parse_args, ["--teacher_cache_top_k", "5"], "--teacher_cache_top_k is read with --teacher_cache only"),
    (parse_args, ["--teacher_cache", "r", "--streaming", "true"], "it cannot record a --streaming one"),
    (parse_args, ["--optim", "sgd", "--adam_beta1", "0.8"], "--adam_beta1 is not read by --optim sgd"),
    (parse_args, ["--use_cpu", "true", "--fsdp", "full_shard"], "FSDP is asked for"),
    (parse_args, ["--model_ema", "true", "--resume_from_checkpoint", "last"], "--model_ema with --resume_from"),
    (parse_args, ["--validation_dir", "v"], "`validation_dir` needs `train_dir`"),
    (parse_args, ["--train_dir", "t"], "Pass exactly one of `dataset_name` or `train_dir`"),
    (parse_args, ["--model_name_or_path", "{checkpoint}", "--config_overrides", "hidden_size=64"],
     "--config_overrides changes a --model_preset"),
    (parse_args, ["--model_name_or_path", "{checkpoint}", "--model_preset", "deit-tiny-distilled-patch16-224"],
     "--model_preset and --model_name_or_path both describe the student"),
    (parse_args, ["--model_name_or_path", "{checkpoint}", "--input_size", "33"], "is not a multiple of the checkpoint"),
    (train_teacher.parse_args, ["--teacher_model", "resnet18", "--mixup", "0.8"], "--mixup makes soft targets"),
    (train_teacher.parse_args, ["--teacher_model", "resnet18", "--pretrained", "true", "--teacher_checkpoint", "t"],
     "--pretrained and --teacher_checkpoint both give the starting weights"),
    (train_teacher.parse_args, ["--teacher_model", "resnet18", "--train_dir", "t"], "Pass exactly one of"),
]


def refusal(parse, argv: list[str], monkeypatch) -> tuple[str, str]:
    """The file whose code raised the refusal of `argv` (the last frame of its traceback), and its message."""
    raised = []

    def error(parser, message):  # argparse's exit, called while the refusal is being handled
        raised.append(sys.exc_info()[1])
        raise SystemExit(2)

    monkeypatch.setattr(argparse.ArgumentParser, "error", error)
    with pytest.raises(SystemExit):
        parse(argv)
    (exception,) = raised
    return Path(traceback.extract_tb(exception.__traceback__)[-1].filename).name, str(exception)


@pytest.mark.parametrize("flags, message", REFUSED, ids=[" ".join(flags) for flags, _ in REFUSED])
def test_each_refusal_is_raised_by_the_checks_or_by_a_dataclass_of_its_field(flags, message, monkeypatch):
    site, text = refusal(parse_args, ["--dataset_name", "x", *flags], monkeypatch)
    assert message in text and site in ("argument_checks.py", "args.py", "data_args.py"), (site, text)


@pytest.mark.parametrize("parse, flags, message", CROSS_FLAG_REFUSED,
                         ids=[" ".join(flags) for _, flags, _ in CROSS_FLAG_REFUSED])
def test_a_rule_between_flags_is_raised_by_the_checks_module(parse, flags, message, tmp_path, monkeypatch):
    DeiTConfig.from_preset("deit-tiny-distilled-patch16-224").save_pretrained(tmp_path)
    argv = ["--dataset_name", "x", *(flag.format(checkpoint=tmp_path) for flag in flags)]
    site, text = refusal(parse, argv, monkeypatch)
    assert message in text and site == "argument_checks.py", (site, text)


@pytest.mark.parametrize("flags, message", [
    ([], "training.record_teacher needs --teacher_cache DIR: where to record the teacher's targets."),
    (["--teacher_cache", "r", "--teacher_cache_check", "2"], "--teacher_cache_check is read by a training run"),
])
def test_the_recording_command_refuses_what_it_would_not_do_in_one_line(flags, message):
    with pytest.raises(SystemExit, match=message) as exit_info:
        record_teacher.main(["--dataset_name", "x", *flags])
    assert "\n" not in str(exit_info.value.code)


@pytest.mark.parametrize("parse", [parse_args, train_teacher.parse_args], ids=["train", "train_teacher"])
def test_deepspeed_without_its_package_is_refused_in_one_line_and_leaves_transformers_clean(parse, capsys):
    """TrainingArguments would register a half-built DeepSpeed config globally, then fail with an ImportError: every
    model built afterwards in the process would fail (found by the command-line property test)."""
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    with pytest.raises(SystemExit) as exit_info:
        parse(["--teacher_model", "resnet18", "--dataset_name", "d", "--deepspeed", "ds.json"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        "--deepspeed needs the deepspeed package, which is not installed (pip install deepspeed).")
    assert not is_deepspeed_zero3_enabled()


@pytest.mark.parametrize("parse", [parse_args, train_teacher.parse_args], ids=["train", "train_teacher"])
def test_an_unreadable_file_an_option_names_is_refused_in_one_line(parse, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse(["--teacher_model", "resnet18", "--dataset_name", "d", "--accelerator_config", str(tmp_path / "no.json")])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(f"No such file or directory: '{tmp_path}/no.json'")
