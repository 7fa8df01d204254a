"""Fine-tuning at a higher resolution with the teacher, and classical distillation of a DeiT without distillation
token, through `python -m training.train`."""

import json
import logging
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed
from transformers import pipeline

from deit_hf import DeiTConfig, DeiTForImageClassification, DeiTForImageClassificationWithTeacher
from deit_hf.distillation_types import get_distillation_type
from training import build, train
from training.build import apply_recipe_schedule
from training.train import main, parse_args

from .conftest import tiny_run_args

FINE_TUNE_384 = Path(train.__file__).parent / "configs" / "finetune_384.yaml"


@pytest.fixture
def checkpoint_at_32(tmp_path):
    """A 32 px DeiT⚗ checkpoint (4x4 patch grid) for the digits' 10 classes."""
    torch.manual_seed(0)
    names = {index: str(index) for index in range(10)}
    config = DeiTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, num_labels=10, id2label=names,
                        label2id={name: index for index, name in names.items()})
    model = DeiTForImageClassificationWithTeacher(config)
    model.save_pretrained(tmp_path / "at32")
    return tmp_path / "at32", model.deit.embeddings.position_embeddings.detach().clone()


def without(args, *flags):
    for flag in flags:
        index = args.index(flag)
        del args[index:index + 2]
    return args


def test_fine_tuning_at_a_higher_resolution_with_the_teacher_at_that_size(
        small_digits_dir, random_teacher_dir, checkpoint_at_32, tmp_path, monkeypatch, caplog):
    path, stored = checkpoint_at_32
    teacher_sizes = []
    load_teacher = build.load_teacher

    def recording_teacher(*args, **kwargs):  # records the size of every batch the teacher is given
        teacher = load_teacher(*args, **kwargs)
        teacher.register_forward_pre_hook(lambda module, inputs: teacher_sizes.append(tuple(inputs[0].shape[-2:])))
        return teacher

    monkeypatch.setattr(build, "load_teacher", recording_teacher)
    args = without(tiny_run_args(small_digits_dir, random_teacher_dir, tmp_path / "out", "--max_steps", "2",
                                 "--do_eval", "true", "--model_name_or_path", str(path), "--blr", "1e-7"),
                   "--model_preset", "--config_overrides", "--input_size")
    caplog.set_level(logging.INFO, logger="training")
    # the 384 preset, with the tiny run's flags over it: 64 px instead of 384
    trainer = main([str(FINE_TUNE_384), *args, "--input_size", "64"])

    assert "Fine-tuning at 64 px from" in caplog.text and "trained at 32 px" in caplog.text
    model = trainer.model
    assert type(model) is DeiTForImageClassificationWithTeacher and model.config.image_size == 64
    # the position embeddings started from the checkpoint's, resampled (a learning rate of 2e-9 keeps them there)
    expected = resample_abs_pos_embed(stored, new_size=[8, 8], num_prefix_tokens=2)
    torch.testing.assert_close(model.deit.embeddings.position_embeddings.detach().cpu(), expected, atol=1e-5, rtol=0)
    assert teacher_sizes and set(teacher_sizes) == {(64, 64)}  # training, evaluation and the blank probe: all 64 px
    assert trainer.teacher.input_size is None  # a convnet: no resize to a size of its own
    processor = json.loads((tmp_path / "out" / "preprocessor_config.json").read_text())
    assert processor["crop_size"] == {"height": 64, "width": 64}  # the eval transform follows --input_size
    assert {"eval_top1", "eval_dist_top1", "eval_teacher_top1"} <= json.loads(
        (tmp_path / "out" / "eval_results.json").read_text()).keys()
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"fine-tuned at 64 px from `{path}`, trained at 32 px" in card
    assert trainer.args.lr_scheduler_type.value == "constant_with_warmup"  # the preset's schedule ran


def test_the_384_preset_is_facebookresearch_readme_recipe_with_hard_distillation(checkpoint_at_32):
    path, _ = checkpoint_at_32
    arguments = parse_args([str(FINE_TUNE_384), "--model_name_or_path", str(path), "--dataset_name", "x"])
    distill_args, aug_args, training_args = arguments.distillation, arguments.augmentation, arguments.training
    assert aug_args.input_size == 384
    assert (training_args.num_train_epochs, training_args.weight_decay, distill_args.warmup_epochs) == (30, 1e-8, 5)
    assert (distill_args.distillation_type, distill_args.distillation_alpha) == ("hard", 0.5)
    training_args.per_device_train_batch_size = 32 * 16  # the README's global batch of 512
    apply_recipe_schedule(training_args, distill_args, train_size=1_281_167)
    assert training_args.learning_rate == pytest.approx(5e-6)  # --lr 5e-6 at 512, --min-lr 5e-6: flat
    assert training_args.lr_scheduler_type.value == "constant_with_warmup" and training_args.lr_scheduler_kwargs == {}


def test_downsampling_a_checkpoint_works_with_a_warning(checkpoint_at_32, caplog):
    path, _ = checkpoint_at_32
    aug_args = parse_args(["--model_name_or_path", str(path), "--dataset_name", "x", "--input_size", "16"]).augmentation
    assert aug_args.input_size == 16
    assert "--input_size 16 is below the 32 px the checkpoint was trained at" in caplog.text


@pytest.mark.parametrize("distillation_type", ["soft", "hard", "none"])
def test_classical_distillation_trains_a_deit_without_distillation_token(
        distillation_type, small_digits_dir, random_teacher_dir, tmp_path):
    output = tmp_path / "out"
    teacher = None if distillation_type == "none" else random_teacher_dir
    trainer = main(tiny_run_args(small_digits_dir, teacher, output, "--distillation_token", "false",
                                 "--distillation_type", distillation_type, "--max_steps", "2", "--logging_steps", "1",
                                 "--do_eval", "true"))
    model = trainer.model
    assert type(model) is DeiTForImageClassification and not model.config.use_distillation_token
    assert not [key for key in load_file(output / "model.safetensors") if "distillation" in key]
    (log, *_) = [entry for entry in trainer.state.log_history if "base_loss" in entry]
    assert "cls_top1" in log and not {"dist_top1", "token_cosine"} & log.keys()
    assert ("distillation_loss" in log) == (distillation_type != "none")
    metrics = json.loads((output / "eval_results.json").read_text())
    assert "eval_top1" in metrics and not [name for name in metrics if "dist_" in name or "cosine" in name]
    assert ("eval_teacher_agreement" in metrics) == (distillation_type != "none")
    card = (output / "README.md").read_text()
    assert ("classical distillation of the class head" in card) == (distillation_type != "none")
    assert "without distillation token" in card
    classifier = pipeline("image-classification", model=str(output))
    assert type(classifier.model) is DeiTForImageClassification
    assert classifier(Image.new("RGB", (32, 32)), top_k=1)[0]["label"] in model.config.label2id


def test_labels_trains_the_distillation_token_as_a_second_class_token(small_digits_dir, tmp_path):
    output = tmp_path / "out"
    trainer = main(tiny_run_args(small_digits_dir, None, output, "--distillation_type", "labels", "--max_steps", "2",
                                 "--logging_steps", "1", "--do_eval", "true"))
    assert trainer.teacher_targets is None and trainer.model.config.distillation_type == "labels"
    (log, *_) = [entry for entry in trainer.state.log_history if "base_loss" in entry]
    assert {"distillation_loss", "dist_top1", "token_cosine"} <= log.keys()
    metrics = json.loads((output / "eval_results.json").read_text())
    assert "eval_dist_top1" in metrics and "eval_teacher_agreement" not in metrics
    card = (output / "README.md").read_text()
    assert f"distillation_type labels: {get_distillation_type('labels').description}" in card


def test_a_one_head_checkpoint_fine_tunes_as_one(small_digits_dir, tmp_path):
    config = DeiTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, num_labels=3, use_distillation_token=False)
    DeiTForImageClassification(config).save_pretrained(tmp_path / "one_head")
    args = without(tiny_run_args(small_digits_dir, None, tmp_path / "out", "--distillation_type", "none",
                                 "--max_steps", "1", "--model_name_or_path", str(tmp_path / "one_head")),
                   "--model_preset", "--config_overrides")
    assert type(main(args).model) is DeiTForImageClassification
    with pytest.raises(SystemExit):
        parse_args([*args, "--distillation_token", "true"])
