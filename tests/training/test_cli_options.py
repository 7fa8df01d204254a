"""`training.cli_options`: the saved options equal the real parser's, and answer as it does, before torch loads."""

import json
import os
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from training import cli_options
from training.train import build_parser, parse_args

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def saved(tmp_path, monkeypatch) -> dict:
    """The options parse_args keeps, in a cache of the test's own."""
    monkeypatch.setenv("DEIT_HF_CACHE", str(tmp_path / "cache"))
    with pytest.raises(SystemExit):
        parse_args(["--bogus"])  # builds the real parser, and keeps its options, before refusing
    with open(cli_options.cache_path()) as file:
        return json.load(file)


def test_kept_options_are_the_parsers(saved):
    assert saved == cli_options.describe(build_parser())


def test_the_cache_is_named_by_the_transformers_version(saved, monkeypatch):
    path = cli_options.cache_path()
    monkeypatch.setattr(cli_options.metadata, "version", lambda name: "0.0")
    assert cli_options.cache_path() != path
    cli_options.answer_early(["--bogus"])  # returns: nothing kept for that installation


def test_an_unwritable_cache_is_skipped(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("DEIT_HF_CACHE", str(tmp_path / "file" / "cache"))  # under a file: cannot be created
    cli_options.save(build_parser())
    cli_options.answer_early(["--bogus"])


def test_help_is_the_parsers_but_for_machine_defaults(saved):
    real = build_parser()
    for action in real._actions:
        if action.dest in cli_options.MACHINE_DEFAULTS:
            action.default = cli_options.MACHINE_DEFAULTS[action.dest]
    assert cli_options.rebuild(saved, prog="train.py").format_help() == real.format_help().replace(
        os.path.basename(sys.argv[0]), "train.py")


def refusal(parse, argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        parse(argv)
    return exit_info.value.code, capsys.readouterr().err


def test_early_answers_are_the_parsers(saved, capsys):
    for argv in (["--dataset_name", "d", "--bogus", "3"], ["--num_train_epochs", "abc"], ["--distillation_type", "foo"],
                 ["--repeated_aug", "maybe"], ["--per_device_train_batch_size", "1.5"], ["--help"]):
        early = refusal(cli_options.answer_early, argv, capsys)
        assert early == refusal(parse_args, argv, capsys), argv
        assert early[0] == (0 if argv == ["--help"] else 2)


def test_a_config_file_first_is_left_to_the_real_parser(saved):
    cli_options.answer_early(["settings.yaml", "--bogus"])  # the file's values may decide: not answered here


def option_values(option: dict):
    """Values a user may type for an option: well-formed ones of its type and a few malformed ones."""
    well_formed = {
        "int": st.integers(-3, 300).map(str),
        "float": st.floats(-1, 1e3, allow_nan=False).map(repr),
        "string_to_bool": st.sampled_from(["true", "false", "yes", "0"]),
        "choice": st.sampled_from([str(choice) for choice in option["choices"] or [""]]),
    }.get(option["type"], st.text("abc/_.0", max_size=5))
    return st.one_of(well_formed, st.sampled_from(["", "x", "1.5", "-1", "none"]))


@st.composite
def command_lines(draw, options: list[dict]) -> list[str]:
    argv = []
    for option in draw(st.lists(st.sampled_from(options), max_size=4)):
        argv.append(draw(st.sampled_from(option["option_strings"] + ["--not_an_option"])))
        if option["action"] == "store":
            argv.append(draw(option_values(option)))
    return argv


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_an_early_refusal_is_always_the_real_parsers(saved, capsys, data):
    options = [option for option in saved["options"] if option["action"] != "help"]
    argv = data.draw(command_lines(options))
    try:
        cli_options.answer_early(argv)
    except SystemExit as early:
        assert early.code == 2
        early_message = capsys.readouterr().err
        code, message = refusal(parse_args, argv, capsys)
        assert code == 2, argv
        # The same first refusal, unless the real parser names an earlier one that is not argparse's own: a
        # dataclass's refusal before an unknown option, or a value of a type left to it (a dict, a config).
        unchecked = {string for option in options if option["action"] == "store" and option["type"] is None
                     for string in option["option_strings"]}
        if cli_options.UNUSED_ARGUMENTS.format("") not in early_message and not unchecked & set(argv):
            assert message == early_message, argv


@pytest.mark.slow
def test_help_answers_without_torch_or_the_trainer_once_options_are_kept(tmp_path):
    env = {**os.environ, "DEIT_HF_CACHE": str(tmp_path)}
    imported = []
    for _ in range(2):  # the first builds the real parser, and keeps its options
        # -X importtime lists every module the process imported
        result = subprocess.run([sys.executable, "-X", "importtime", "-m", "training.train", "--help"], cwd=REPO,
                                capture_output=True, text=True, timeout=600, env=env)
        assert result.returncode == 0 and "--teacher_model" in result.stdout
        imported.append({line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line})
    assert {"torch", "transformers.training_args"} <= imported[0]
    assert not {"torch", "peft", "transformers.trainer", "transformers.training_args"} & imported[1]
