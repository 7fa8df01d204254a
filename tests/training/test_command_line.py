"""`python -m training.train` on a user's mistake: one line on stderr naming the path or item, no traceback."""

import re
import subprocess
import sys

import pytest

from training.args import DataArguments
from training.data import load_image_datasets
from training.train import main

from .conftest import tiny_run_args
from .test_distributed import REPO, probe_env


def run_train(args: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "training.train", *map(str, args)], capture_output=True, text=True,
                          env=probe_env(**env), cwd=REPO, timeout=600, stdin=subprocess.DEVNULL)


def assert_one_line_error(result: subprocess.CompletedProcess, *named: str) -> None:
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    (line,) = [line for line in result.stderr.splitlines() if "error:" in line]
    assert all(name in line for name in named), line


@pytest.mark.slow
def test_a_missing_train_dir_is_one_line_naming_it(tmp_path):
    result = run_train(["--train_dir", tmp_path / "no_such_train", "--distillation_type", "none"])
    assert_one_line_error(result, str(tmp_path / "no_such_train"))


@pytest.mark.parametrize("source, message", [
    (dict(dataset_name="{tmp}/no_such_data"), "no such file or directory"),
    (dict(train_dir="{tmp}", validation_dir="{tmp}/no_such_val"), "no such directory"),
    (dict(train_dir="{tmp}/cats"), "holds no class directories"),
])
def test_a_missing_or_empty_dataset_path_is_named(source, message, tmp_path):
    (tmp_path / "cats").mkdir()
    source = {flag: path.format(tmp=tmp_path) for flag, path in source.items()}
    flag, path = list(source.items())[-1]
    with pytest.raises(ValueError, match=re.escape(f"--{flag} {path!r}") + ".*" + message):
        load_image_datasets(DataArguments(**source))


@pytest.mark.slow
def test_errors_after_parsing_are_one_line_and_the_traceback_is_an_opt_in(small_digits_dir, random_teacher_dir,
                                                                           tmp_path):
    # the default teacher offline: its weights cannot be fetched
    offline = run_train(tiny_run_args(small_digits_dir, None, tmp_path / "a"))
    assert_one_line_error(offline, "regnety_160.deit_in1k", "--teacher_checkpoint")
    # a record of another run
    args = tiny_run_args(small_digits_dir, random_teacher_dir, tmp_path / "b", "--max_steps", "1",
                         "--eval_strategy", "no", "--do_eval", "false", "--teacher_cache", str(tmp_path / "cache"))
    main(args)
    refused = run_train([*args, "--seed", "7", "--output_dir", tmp_path / "c"])
    assert_one_line_error(refused, "seed: recorded 42, now 7")
    shown = run_train([*args, "--seed", "7", "--output_dir", tmp_path / "c"], DEIT_HF_TRACEBACK="1")
    assert shown.returncode != 0 and "Traceback" in shown.stderr and "TeacherRecordError" in shown.stderr


@pytest.mark.slow
def test_the_schedule_line_is_logged_under_python_m(small_digits_dir, tmp_path):
    result = run_train(tiny_run_args(small_digits_dir, None, tmp_path / "run", "--distillation_type", "none",
                                     "--max_steps", "1", "--eval_strategy", "no", "--do_eval", "false"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "INFO training.build: Global batch 8: learning rate" in result.stderr
