"""Every code snippet of the README and of the model cards runs in the test suite, so the documentation cannot rot.

Python blocks run as written, in a folder holding a `cat.jpg`, with stand-ins for what CI cannot have
(`STAND_INS`): `path/to/checkpoint` and the cards' Hub ids (`deit-hf/<preset>`) become a converted random-init
checkpoint; `path/to/dataset` becomes 48 digits and the paper's teacher `regnety_160.deit_in1k` (weights from the Hub)
a local random ResNet; `training.train.main` gets `TINY_RUN` appended, so a full-size run shown in the README trains a
tiny model for two steps. Shell blocks: each command is checked by what it runs (`check_command`): a `make` target
exists, training flags parse (`training.train.parse_args`, behind `accelerate launch`'s own parser when launched), a
conversion converts (stand-in weights written where the command reads them), a `wget` of facebookresearch/deit's
weights writes timm's random-init model of that name as they are distributed. A command of any other kind fails: add
its check here.

The README's journey (between `<!-- journey -->` and `<!-- /journey -->`: images → teacher → converted DeiT⚗ →
fine-tuned DeiT⚗ → pipeline → push) is run instead, its blocks in order in one folder (`test_the_journey_runs`):
its training commands run as written at tiny scale (`TINY_SCALE` appended; `JOURNEY_STAND_INS` for the paper's
teacher, timm's weights from a stand-in file) on a folder of digits, and `push_to_hub` writes to a local folder.
"""

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import timm
import torch
from accelerate.commands.launch import launch_command_parser
from huggingface_hub import ModelCard, RepoCard
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN
from transformers import PreTrainedModel, pipeline
from transformers.image_processing_utils import ImageProcessingMixin
from transformers.utils.hub import PushToHubMixin

import training.train
import training.train_teacher
from deit_hf import PRESETS
from deit_hf.convert import convert_timm_model
from deit_hf.convert import main as convert_main
from deit_hf.modelcard import HUB_ORGANISATION
from training.train import parse_args
from training.train_teacher import parse_args as train_teacher_parse_args

from .training.conftest import (  # the fixtures below are used by name  # noqa: F401
    IMAGE_SIZE,
    STILL_AUGMENTATION,
    TINY_STUDENT,
    digits,
    random_teacher_dir,
    small_digits_dir,
)
from .training.test_data import write_imagefolder

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "model_cards").glob("*/README.md"))]
FENCED_BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
JOURNEY = re.compile(r"^<!-- journey -->\n(.*?)^<!-- /journey -->", re.MULTILINE | re.DOTALL)
PYTHON, SHELL, IGNORED = ("python",), ("bash", "sh", "shell", "console"), ("bibtex", "yaml", "json", "text")
# A training command at tiny scale: two steps of 8 images at 32 px, nothing random but the order.
TINY_SCALE = [
    "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "32", "--dataloader_num_workers", "0",
    "--report_to", "none", "--disable_tqdm", "true", "--max_steps", "2", *STILL_AUGMENTATION,
]
# The student's: the tests' random teachers are at chance, which the teacher pre-flight refuses.
TINY_DISTILLATION = [*TINY_SCALE, "--teacher_check_batches", "0"]
TINY_RUN = ["--config_overrides", TINY_STUDENT, "--drop_path_rate", "0", *TINY_DISTILLATION]
# The journey's teacher: the paper's RegNetY-16GF (84 M parameters) becomes timm's 470 k-parameter test ResNet, named
# with its pretrained tag as the RegNetY is.
JOURNEY_STAND_INS = {"regnety_160.deit_in1k": "test_resnet.r160_in1k"}
# What the journey's blocks do, in order: a change of step here or in the README fails the journey's test.
JOURNEY_STEPS = ["training.train_teacher", "wget", "deit_hf.convert", "training.train", "python"]


def fenced_blocks(path: Path, journey: bool = False) -> list[tuple[str, str]]:
    """(language, code) of the blocks of `path` in order: outside the journey section, or (`journey`) in it."""
    text = path.read_text(encoding="utf-8")
    found = FENCED_BLOCK.findall("".join(JOURNEY.findall(text)) if journey else JOURNEY.sub("", text))
    unknown = {language for language, _ in found} - set(PYTHON + SHELL + IGNORED)
    assert not unknown, f"{path.name}: code blocks in {unknown or 'no'} language; mark them python, bash or text"
    return found


def blocks(path: Path, languages: tuple[str, ...]) -> list[str]:
    """The code of the blocks of `path` in `languages`, but the journey's (run by `test_the_journey_runs`)."""
    return [code for language, code in fenced_blocks(path) if language in languages]


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
    """The working folder of a snippet, a `cat.jpg` in it."""
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (64, 48), (200, 120, 40)).save("cat.jpg")
    return tmp_path


@pytest.fixture
def tiny_training(monkeypatch):
    """`training.train.main` shrunk to a tiny run of a tiny DeiT⚗."""
    full_main = training.train.main
    monkeypatch.setattr(training.train, "main", lambda argv, **kwargs: full_main([*argv, *TINY_RUN], **kwargs))


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
def test_python_snippet_runs(origin, code, stand_ins, snippet_folder, tiny_training):
    run_python(substituted(code, stand_ins), origin)


def stand_in_weights(timm_name: str, path: Path, **kwargs) -> None:
    """timm's random initialisation of `timm_name`, saved at `path` (`kwargs`: `timm.create_model`'s)."""
    torch.save(timm.create_model(timm_name, pretrained=False, **kwargs).state_dict(), path)


def check_command(words: list[str], folder: Path, run: bool = False) -> None:
    """Check one documented shell command without running anything long; `run`: run a training command for real,
    at tiny scale (`TINY_SCALE`)."""
    if words[0] == "make":
        subprocess.run(["make", "-n", *words[1:]], cwd=ROOT, check=True, capture_output=True)
    elif words[0] == "wget":  # facebookresearch/deit's weights: timm's random init of that model, as they ship it
        url = words[1]
        file = url.rsplit("/", 1)[1]
        name = file.split("-")[0]
        assert words == ["wget", url] and url == timm.models.get_pretrained_cfg(name).url, words
        torch.save({"model": timm.create_model(name, pretrained=False).state_dict()}, folder / file)
    elif words[:3] == ["python", "-m", "training.train_teacher"]:
        arguments = words[3:]
        if run and "--pretrained" in arguments:  # offline: timm's weights stand in as a local checkpoint
            arguments.remove("--pretrained")
            stand_in_weights(arguments[arguments.index("--teacher_model") + 1], folder / "pretrained.pth")
            arguments += ["--teacher_checkpoint", str(folder / "pretrained.pth")]
        training.train_teacher.main([*arguments, *TINY_SCALE]) if run else train_teacher_parse_args(arguments)
    elif words[:3] == ["python", "-m", "training.train"]:
        arguments = words[3:]
        if arguments[0].endswith((".yaml", ".json")):  # a config file of the repository
            arguments[0] = str(ROOT / arguments[0])
        training.train.main([*arguments, *TINY_DISTILLATION]) if run else parse_args(arguments)
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
            stand_in_weights(name, folder / "pretrained.pth", num_classes=10)
            arguments += ["--checkpoint", "pretrained.pth"]
        elif "--checkpoint" in arguments:  # stand-in weights of the named architecture, unless a `wget` wrote them
            if not (weights := folder / arguments[arguments.index("--checkpoint") + 1]).exists():
                stand_in_weights(name, weights, num_classes=10)
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


def per_class(split, count: int):
    """The first `count` images of each class, so that every class has a folder."""
    labels = split["label"][:]
    names = range(len(split.features["label"].names))
    return split.select([index for label in names for index in [i for i, y in enumerate(labels) if y == label][:count]])


@pytest.fixture
def local_hub(tmp_path, monkeypatch):
    """`push_to_hub` of models, processors and cards writes to `hub/<repo id>`, where the Hub would hold them."""
    hub = tmp_path / "hub"

    def push(pushed, repo_id, **kwargs):
        if isinstance(pushed, ModelCard):
            (hub / repo_id).mkdir(parents=True, exist_ok=True)
            pushed.save(hub / repo_id / "README.md")
        else:
            pushed.save_pretrained(hub / repo_id)

    for owner in (PushToHubMixin, PreTrainedModel, ImageProcessingMixin, RepoCard):  # each defines its own
        monkeypatch.setattr(owner, "push_to_hub", push)
    return hub


@pytest.mark.slow
def test_the_journey_runs(snippet_folder, digits, local_hub):  # noqa: F811
    """The README's journey, its blocks in order in one folder: a folder of digits sorted by class, a teacher trained
    on it, facebookresearch/deit's DeiT-Ti⚗ (random weights) converted and fine-tuned with that teacher, `pipeline`
    on the result and its push; then what the README says each step leaves."""
    write_imagefolder(per_class(digits["train"], 3), snippet_folder / "my_images" / "train")
    write_imagefolder(per_class(digits["validation"], 2), snippet_folder / "my_images" / "val")
    journey = fenced_blocks(ROOT / "README.md", journey=True)
    code = "".join(code for _, code in journey)
    assert all(name in code for name in JOURNEY_STAND_INS), "a stand-in for a name the journey no longer uses"
    steps = []
    for language, code in journey:
        if language in SHELL:
            for words in shell_commands(code):
                steps.append(words[2] if words[0] == "python" else words[0])
                check_command([JOURNEY_STAND_INS.get(word, word) for word in words], snippet_folder, run=True)
        elif language in PYTHON:
            steps.append("python")
            namespace = run_python(code, "README.md#journey")
    assert steps == JOURNEY_STEPS

    names = [str(digit) for digit in range(10)]  # the folders' names
    teacher = snippet_folder / "outputs" / "teacher"
    config = json.loads((teacher / "config.json").read_text())
    assert config["label_names"] == names and config["image_size"] == IMAGE_SIZE
    assert config["architecture"] == JOURNEY_STAND_INS["regnety_160.deit_in1k"]
    assert (teacher / "model.safetensors").is_file()
    timm_normalisation = timm.data.resolve_model_data_config(timm.create_model(config["architecture"]))
    processor = json.loads((teacher / "preprocessor_config.json").read_text())
    assert (processor["image_mean"], processor["image_std"]) == (list(timm_normalisation["mean"]),
                                                                 list(timm_normalisation["std"]))
    top1 = json.loads((teacher / "eval_results.json").read_text())["eval_top1"]
    card = ModelCard.load(teacher / "README.md")
    assert card.data.eval_results[0].metric_value == round(100 * top1, 2)
    assert card.data.eval_results[0].dataset_name == "my_images/val"

    converted = json.loads((snippet_folder / "deit-ti" / "config.json").read_text())
    assert len(converted["id2label"]) == 1000 and converted["image_size"] == 224
    processor = json.loads((snippet_folder / "deit-ti" / "preprocessor_config.json").read_text())
    assert processor["crop_size"]["height"] == 224 and processor["image_mean"] == list(IMAGENET_DEFAULT_MEAN)
    assert (snippet_folder / "deit-ti" / "README.md").is_file()

    student = snippet_folder / "outputs" / "deit-ti-my-images"
    config = json.loads((student / "config.json").read_text())
    assert list(config["id2label"].values()) == names and config["image_size"] == IMAGE_SIZE
    assert {"modeling_deit.py", "model.safetensors", "preprocessor_config.json"} <= {path.name for path in
                                                                                    student.iterdir()}
    processor = json.loads((student / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == list(IMAGENET_DEFAULT_MEAN) and processor["crop_size"]["height"] == IMAGE_SIZE
    assert sorted(path.name for path in student.glob("checkpoint-*")) == ["checkpoint-2"]
    evaluation = json.loads((student / "eval_results.json").read_text())
    card = (student / "README.md").read_text()
    assert ModelCard(card).data.eval_results[0].metric_value == round(100 * evaluation["eval_top1"], 2)
    assert all(f"| {row} | {evaluation[key]:.4f} |" in card for row, key in (
        ("fused (cls + dist) / 2", "eval_top1"), ("class head", "eval_cls_top1"),
        ("distillation head", "eval_dist_top1"), ("teacher", "eval_teacher_top1")))

    predictions = namespace["classifier"]("cat.jpg", top_k=3)
    assert {prediction["label"] for prediction in predictions} <= set(names)
    pushed = local_hub / "your-name" / "deit-ti-my-images"
    assert pipeline("image-classification", model=str(pushed))("cat.jpg", top_k=3) == predictions
    assert (pushed / "modeling_deit.py").is_file()  # the model's code: transformers alone loads it
    assert (pushed / "README.md").read_text() == card
