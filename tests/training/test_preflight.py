"""What a run refuses or settles before step 1 besides the teacher: validation images that do not decode, an input size
whose activations cannot fit, and an evaluation-only stream that needs no --max_steps."""

import logging

import datasets
import pytest
from transformers import TrainingArguments

from deit_hf import DeiTConfig
from training.build import build_trainer
from training.memory_check import activation_bytes, check_activation_memory
from training.train import main, parse_args

from .conftest import tiny_run_args
from .test_collator import GARBAGE

GiB = 2 ** 30


@pytest.fixture(scope="module")
def undecodable_validation_dir(few_digits, tmp_path_factory):
    """Good training digits, and validation images that are all garbage bytes."""
    path = tmp_path_factory.mktemp("undecodable")
    validation = datasets.Dataset.from_list(
        [{"image": {"bytes": GARBAGE, "path": f"{index}.jpg"}, "label": index % 10} for index in range(20)],
        features=few_digits["validation"].features,
    )
    datasets.DatasetDict({"train": few_digits["train"], "validation": validation}).save_to_disk(str(path))
    return path


def test_without_a_teacher_check_a_validation_set_that_does_not_decode_is_refused_before_step_1(
        undecodable_validation_dir, tmp_path):
    with pytest.raises(ValueError, match=r"^No validation image decoded among the pre-flight's images: every "
                                         r"evaluation would measure nothing\. .*--eval_strategy no"):
        main(tiny_run_args(undecodable_validation_dir, None, tmp_path / "out", "--distillation_type", "none",
                           "--num_train_epochs", "1"))
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_without_a_teacher_the_check_reads_the_validation_images_and_says_how_many_decoded(small_digits_dir,
                                                                                           tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="training"):
        main(tiny_run_args(small_digits_dir, None, tmp_path / "out", "--distillation_type", "none", "--max_steps", "1"))
    assert "reads 32 of the 32 validation images, from 10 of its 10 classes" in caplog.text
    assert "Pre-flight: 32 validation images decoded." in caplog.text


def test_an_evaluation_only_stream_needs_no_max_steps(small_digits_dir, tmp_path):
    trainer = main(tiny_run_args(small_digits_dir, None, tmp_path / "out", "--streaming", "true",
                                 "--do_train", "false", "--do_eval", "true"))
    assert trainer.train_dataset is None
    assert (tmp_path / "out" / "eval_results.json").exists()


def deit_base(**overrides) -> DeiTConfig:
    return DeiTConfig.from_preset("deit-base-distilled-patch16-224", **overrides)


def arguments(**overrides) -> TrainingArguments:
    return TrainingArguments(output_dir="unused", use_cpu=True, report_to="none", do_train=True, **overrides)


def test_the_estimate_counts_what_a_layer_keeps_per_token_and_the_attention_scores_where_materialised():
    config = deit_base()  # 198 tokens, hidden 768, 12 heads, 12 layers, MLP 3072
    config._attn_implementation = "sdpa"  # what a model built from it runs (a bare config says None)
    kept, evaluated, scores = 9 * 768 + 2 * 3072, 768 + 2 * 3072, 12 * 198 ** 2
    assert activation_bytes(config, 128, training=True, bytes_per_value=4) == 128 * 4 * 12 * 198 * kept
    assert activation_bytes(config, 128, training=False, bytes_per_value=2) == 128 * 2 * 198 * evaluated
    config._attn_implementation = "eager"  # materialises the scores, and keeps every layer's for the backward
    assert activation_bytes(config, 1, training=True, bytes_per_value=4) == 4 * 12 * (198 * kept + scores)
    assert activation_bytes(config, 1, training=False, bytes_per_value=4) == 4 * (198 * evaluated + scores)


def test_deit_base_at_224_px_and_batch_128_passes_on_a_gpu(monkeypatch):
    monkeypatch.setattr("training.memory_check.available_memory", lambda device: 78 * GiB)  # an H100's free memory
    check_activation_memory(deit_base(), arguments(per_device_train_batch_size=128, per_device_eval_batch_size=128))
    check_activation_memory(deit_base(image_size=384), arguments(per_device_train_batch_size=64, bf16=True))
    with pytest.raises(ValueError, match=r"^At 1024 px \(4098 tokens of patch 16\) the student's activations for a "
                                         r"training batch of 128 need at least 306\.1 GiB, and cpu has 78\.0 GiB "
                                         r"available\. Lower --input_size"):
        check_activation_memory(deit_base(image_size=1024), arguments(per_device_train_batch_size=128))


def test_an_input_size_whose_activations_cannot_fit_is_refused_before_the_model_runs(small_digits_dir, tmp_path,
                                                                                     monkeypatch):
    args = tiny_run_args(small_digits_dir, None, tmp_path / "out", "--distillation_type", "none", "--max_steps", "1")
    build_trainer(parse_args(args))  # 32 px: far below what this machine has
    # the 4000 px run the kernel killed at 20.8 GB
    monkeypatch.setattr("training.memory_check.available_memory", lambda device: 16 * GiB)
    monkeypatch.setattr("training.build.preflight", lambda *args: pytest.fail("the model ran"))
    with pytest.raises(ValueError, match=r"^At 4000 px \(250002 tokens of patch 8\) the student's activations for "
                                         r"a training batch of 8 need at least 24\.8 GiB, and cpu has 16\.0 GiB "
                                         r"available\. Lower --input_size"):
        build_trainer(parse_args([*args, "--input_size", "4000"]))
