"""`training.train_teacher`: a teacher for the dataset's classes in one command, that `training.train` takes alone;
and `--teacher_input_size`, a teacher kept at the size it was trained at."""

import json

import pytest
import torch
from datasets import DatasetDict
from huggingface_hub import ModelCard

from deit_hf import DeiTConfig, DeiTForImageClassificationWithTeacher
from training import train_teacher
from training.args import AugmentationArguments, DataArguments
from training.teacher.fingerprint import record_fingerprint
from training.teacher.model import Teacher, input_size_hint
from training.teacher.preflight import DECLARED, check_teacher
from training.train import main, parse_args

from .conftest import IMAGE_SIZE, STILL_AUGMENTATION, tiny_run_args

QUICK = ["--per_device_train_batch_size", "32", "--dataloader_num_workers", "0", "--report_to", "none",
         "--disable_tqdm", "true", "--eval_strategy", "no", "--logging_steps", "100"]


@pytest.fixture(scope="module")
def digits_400(digits, tmp_path_factory):
    path = tmp_path_factory.mktemp("digits_400")
    DatasetDict({"train": digits["train"].select(range(400)), "validation": digits["validation"].select(range(100))}
                ).save_to_disk(str(path))
    return path


@pytest.fixture(scope="module")
def digits_teacher(digits_400, tmp_path_factory):
    """timm's test_resnet (374k parameters, 0.5/0.5 normalisation, bilinear) from random weights, 5 epochs at 32 px:
    ~0.9 held-out top-1 in ~20 s."""
    output = tmp_path_factory.mktemp("teacher")
    train_teacher.main(["--teacher_model", "test_resnet", "--dataset_name", str(digits_400), "--output_dir",
                        str(output), "--num_train_epochs", "5", "--learning_rate", "3e-3", *QUICK,
                        *STILL_AUGMENTATION])
    return output


@pytest.mark.slow
def test_the_teacher_folder_holds_what_a_student_run_needs(digits_teacher):
    config = json.loads((digits_teacher / "config.json").read_text())
    assert config["architecture"] == "test_resnet" and config["image_size"] == IMAGE_SIZE
    assert config["label_names"] == [str(digit) for digit in range(10)] and "distillation_type" not in config
    processor = json.loads((digits_teacher / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == [0.5, 0.5, 0.5] and processor["crop_size"]["height"] == IMAGE_SIZE
    top1 = json.loads((digits_teacher / "eval_results.json").read_text())["eval_top1"]
    card = ModelCard.load(digits_teacher / "README.md")
    assert top1 > 0.5 and card.data.eval_results[0].metric_value == round(100 * top1, 2)
    assert f"Held-out top-1: {100 * top1:.2f} %" in card.text


def test_a_student_takes_the_teacher_folder_alone_and_its_pre_flight_passes(digits_400, digits_teacher, tmp_path,
                                                                            caplog):
    args = tiny_run_args(digits_400, digits_teacher, tmp_path / "run", "--max_steps", "1", "--eval_strategy", "no",
                         "--do_eval", "false")
    del args[args.index("--teacher_check_batches"):args.index("--teacher_check_batches") + 2]  # pre-flight on
    with caplog.at_level("INFO"):
        trainer = main(args)
    assert trainer.teacher.input_size is None and trainer.teacher.renormalizes  # 0.5/0.5 to the student's ImageNet
    assert "Teacher top-1 on 100 validation images" in caplog.text


def test_a_student_fine_tuned_at_64_px_keeps_its_32_px_teacher(digits_400, digits_teacher, tmp_path):
    config = DeiTConfig.from_preset("deit-tiny-distilled-patch16-224", image_size=IMAGE_SIZE, patch_size=8,
                                    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    DeiTForImageClassificationWithTeacher(config).save_pretrained(tmp_path / "deit-32")
    args = tiny_run_args(digits_400, digits_teacher, tmp_path / "run", "--max_steps", "1", "--eval_strategy", "no",
                         "--model_name_or_path", str(tmp_path / "deit-32"), "--teacher_input_size", "32")
    for flag in ("--model_preset", "--config_overrides", "--teacher_check_batches"):
        del args[args.index(flag):args.index(flag) + 2]
    args[args.index("--input_size") + 1] = "64"
    trainer = main(args)  # the pre-flight on: it passes with the teacher at its own 32 px
    assert trainer.teacher.input_size == (32, 32) and trainer.teacher.interpolation == "bicubic"
    card = (tmp_path / "run" / "README.md").read_text()
    assert "fed 32 px images (resized from the student's 64 px)" in card and "fine-tuned at 64 px" in card


def test_a_teacher_near_chance_at_a_size_it_was_not_trained_at_hears_of_the_size_first():
    teacher = Teacher(torch.nn.Linear(2, 10), num_labels=10, native_size=(32, 32))
    assert input_size_hint(teacher, 32) is None
    hint = input_size_hint(teacher, 64)
    assert hint == "it sees 64x64 images, its config or pretrained_cfg says 32x32: try --teacher_input_size 32"
    teacher.input_size = (32, 32)
    assert input_size_hint(teacher, 64) is None
    at_chance = torch.ones(10, 10, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"near chance .* Likely causes: its input size \(it sees 64x64 images"):
        check_teacher({DECLARED: at_chance}, [str(digit) for digit in range(10)], hint)


def test_the_teacher_input_size_is_part_of_a_record_s_identity():
    fingerprints = [
        record_fingerprint({}, arguments.distillation, arguments.augmentation, arguments.training, (0.5,) * 3,
                           (0.5,) * 3)
        for arguments in (parse_args(["--dataset_name", "x", *flags]) for flags in ([], ["--teacher_input_size", "32"]))
    ]
    assert (fingerprints[0]["teacher_input_size"], fingerprints[1]["teacher_input_size"]) == (None, 32)


@pytest.mark.parametrize("model, flags, message", [
    ("resnet18", ["--mixup", "0.8"], "--mixup makes soft targets"),
    ("path/to/hf-classifier", ["--pretrained", "true"], "--pretrained and --teacher_checkpoint are for timm models"),
])
def test_flags_the_teacher_would_not_read_are_refused(model, flags, message, capsys):
    with pytest.raises(SystemExit):
        train_teacher.parse_args(["--teacher_model", model, "--dataset_name", "x", *flags])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("data, flags", [
    ({"train_dir": "my_images/train", "validation_dir": "my_images/val"},
     "--train_dir my_images/train --validation_dir my_images/val"),
    ({"dataset_name": "user/flowers", "image_column": "photo"}, "--dataset_name user/flowers --image_column photo"),
])
def test_the_teacher_card_names_the_data_the_student_command_needs(data, flags):
    card = train_teacher.teacher_card(train_teacher.TeacherArguments("resnet18"), DataArguments(**data),
                                      AugmentationArguments(), 10,
                                      {"eval_top1": 0.5, "eval_images": 20, "eval_skipped_images": 0})
    assert f"`python -m training.train {flags} --teacher_model <this folder>`" in card.text
