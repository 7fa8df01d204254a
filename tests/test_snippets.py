"""Every code snippet of the README and of the model cards runs in the test suite, so the documentation cannot rot.

Python blocks run as written, in a folder holding a `cat.jpg`, with stand-ins for what CI cannot have
(`STAND_INS`): `path/to/checkpoint` and the cards' Hub ids (`deit-hf/<preset>`) become a converted random-init
checkpoint; `path/to/dataset` becomes 48 digits and the paper's teacher `regnety_160.deit_in1k` (weights from the Hub)
a local random ResNet; `training.train.main` gets `TINY_RUN` appended, so a full-size run shown in the README trains a
tiny model for two steps. Shell blocks: each command is checked by what it runs (`check_command`): a `make` target
exists, training flags parse (`training.train.parse_args`, behind `accelerate launch`'s own parser when launched), a
conversion converts (stand-in weights written where the command reads them). A command of any other kind fails: add
its check here.
"""

import re
import shlex
import subprocess
from pathlib import Path

import pytest
import timm
import torch
from accelerate.commands.launch import launch_command_parser
from PIL import Image

import training.train
from deit_hf import PRESETS
from deit_hf.convert import convert_timm_model
from deit_hf.convert import main as convert_main
from deit_hf.modelcard import HUB_ORGANISATION
from training.train import parse_args
from training.train_teacher import parse_args as train_teacher_parse_args

from .training.conftest import (  # the fixtures below are used by name  # noqa: F401
    STILL_AUGMENTATION,
    TINY_STUDENT,
    digits,
    random_teacher_dir,
    small_digits_dir,
)

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "model_cards").glob("*/README.md"))]
FENCED_BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
PYTHON, SHELL, IGNORED = ("python",), ("bash", "sh", "shell", "console"), ("bibtex", "yaml", "json", "text")
TINY_RUN = [
    "--config_overrides", TINY_STUDENT, "--drop_path_rate", "0", "--per_device_train_batch_size", "8",
    "--per_device_eval_batch_size", "32", "--dataloader_num_workers", "0", "--report_to", "none",
    "--disable_tqdm", "true", "--teacher_check_batches", "0", "--max_steps", "2", *STILL_AUGMENTATION,
]


def blocks(path: Path, languages: tuple[str, ...]) -> list[str]:
    found = FENCED_BLOCK.findall(path.read_text(encoding="utf-8"))
    unknown = {language for language, _ in found} - set(PYTHON + SHELL + IGNORED)
    assert not unknown, f"{path.name}: code blocks in {unknown or 'no'} language; mark them python, bash or text"
    return [code for language, code in found if language in languages]


def shell_commands(code: str) -> list[list[str]]:
    """The commands of a shell block: continuation lines joined, comments dropped."""
    return [words for line in code.replace("\\\n", " ").splitlines() if (words := shlex.split(line, comments=True))]


@pytest.fixture(scope="module")
def stand_in_checkpoint(tmp_path_factory):
    """A converted random-init DeiT⚗ (3 classes, 32 px) with its image processor: what the Hub ids stand for here."""
    path = tmp_path_factory.mktemp("stand_in_checkpoint")
    torch.manual_seed(0)
    timm_model = timm.create_model(
        "deit_tiny_distilled_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=32, depth=2,
        num_heads=4, num_classes=3,
    )
    model, processor = convert_timm_model(timm_model)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture
def stand_ins(stand_in_checkpoint, small_digits_dir, random_teacher_dir):  # noqa: F811
    checkpoint = str(stand_in_checkpoint)
    return {
        "path/to/checkpoint": checkpoint,
        **{f"{HUB_ORGANISATION}/{preset}": checkpoint for preset in PRESETS},
        "path/to/dataset": str(small_digits_dir),
        "regnety_160.deit_in1k": str(random_teacher_dir),
    }


@pytest.fixture
def snippet_folder(tmp_path, monkeypatch):
    """The working folder of a snippet: a `cat.jpg` in it, and `training.train.main` shrunk to a tiny run."""
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (64, 48), (200, 120, 40)).save("cat.jpg")
    full_main = training.train.main
    monkeypatch.setattr(training.train, "main", lambda argv, **kwargs: full_main([*argv, *TINY_RUN], **kwargs))
    return tmp_path


def substituted(code: str, stand_ins: dict[str, str]) -> str:
    for name, stand_in in stand_ins.items():
        code = code.replace(f'"{name}"', repr(stand_in))
    return code


def run_python(code: str, origin: str) -> dict:
    namespace = {"__name__": "__snippet__"}
    exec(compile(code, origin, "exec"), namespace)
    return namespace


def python_snippets() -> list[tuple[str, str]]:
    """(origin, code) of every Python block; the four cards' blocks differ only in the Hub id, run each once."""
    seen, snippets = set(), []
    for path in DOCUMENTS:
        for index, code in enumerate(blocks(path, PYTHON)):
            generic = re.sub(rf"{HUB_ORGANISATION}/[\w.-]+", "HUB_ID", code)
            if generic not in seen:
                seen.add(generic)
                snippets.append((f"{path.relative_to(ROOT)}#python{index}", code))
    return snippets


def test_the_documents_have_snippets():
    assert len(DOCUMENTS) == 5  # the README and four cards
    assert len(python_snippets()) >= 5 and any(blocks(ROOT / "README.md", SHELL))


@pytest.mark.parametrize("origin, code", python_snippets(), ids=[origin for origin, _ in python_snippets()])
def test_python_snippet_runs(origin, code, stand_ins, snippet_folder):
    run_python(substituted(code, stand_ins), origin)


def check_command(words: list[str], folder: Path) -> None:
    """Check one documented shell command without running anything long."""
    if words[0] == "make":
        subprocess.run(["make", "-n", *words[1:]], cwd=ROOT, check=True, capture_output=True)
    elif words[:3] == ["python", "-m", "training.train_teacher"]:
        train_teacher_parse_args(words[3:])
    elif words[:3] == ["python", "-m", "training.train"]:
        arguments = words[3:]
        if arguments[0].endswith((".yaml", ".json")):  # a config file of the repository
            arguments[0] = str(ROOT / arguments[0])
        parse_args(arguments)
    elif words[:2] == ["accelerate", "launch"]:
        launch = launch_command_parser().parse_args(words[2:])
        # the recording pass takes the training run's arguments (training.record_teacher)
        assert launch.module and launch.training_script in ("training.train", "training.record_teacher"), words
        parse_args(launch.training_script_args)
    elif words[:3] == ["python", "-m", "deit_hf.convert"]:
        arguments = words[3:]
        name = arguments[arguments.index("--timm-model") + 1]
        if "--pretrained" in arguments:  # offline: timm's weights stand in as a local checkpoint
            arguments.remove("--pretrained")
            arguments += ["--checkpoint", "pretrained.pth"]
        if "--checkpoint" in arguments:  # stand-in weights of the named architecture, where the command reads them
            weights = folder / arguments[arguments.index("--checkpoint") + 1]
            torch.save(timm.create_model(name, pretrained=False, num_classes=10).state_dict(), weights)
        if "--label-names" in arguments:  # as many stand-in names as the stand-in heads predict
            (folder / arguments[arguments.index("--label-names") + 1]).write_text("\n".join(map(str, range(10))))
        convert_main(arguments)
        assert (folder / arguments[arguments.index("--output") + 1] / "model.safetensors").is_file()
    else:
        pytest.fail(f"No check for the documented command {shlex.join(words)!r}: add one to check_command.")


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda path: str(path.relative_to(ROOT)))
@pytest.mark.slow
def test_shell_commands_are_valid(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for code in blocks(path, SHELL):
        for words in shell_commands(code):
            check_command(words, tmp_path)


def test_an_unknown_command_or_flag_fails_the_check(tmp_path):
    with pytest.raises(pytest.fail.Exception, match="No check"):
        check_command(["python", "-m", "benchmarks.run"], tmp_path)
    with pytest.raises((SystemExit, ValueError), match="no_such_flag|^2$"):
        check_command(["python", "-m", "training.train", "--dataset_name", "d", "--no_such_flag", "1"], tmp_path)
