"""Skipped images: counted over DataLoader workers into the logs and metrics, and a stop when too few decode."""

import json
import sys

import datasets
import pytest
import torch
from transformers import TrainerControl, TrainerState

from training.collator import DistillationCollator
from training.skipped_images import MIN_IMAGES_FOR_EARLY_CHECK, SkippedImageCounter, TooFewDecodableImagesError
from training.train import main

from .conftest import tiny_run_args
from .test_distributed import free_port, run

GARBAGE = b"\x89PNG\r\n\x1a\n not really a png"


def batch(decoded: int, skipped: int) -> dict:
    samples = [{"pixel_values": torch.zeros(3, 2, 2, dtype=torch.uint8), "labels": 0}] * decoded
    return DistillationCollator()(samples + [{"pixel_values": None, "labels": None}] * skipped)


def begin_epoch(counter: SkippedImageCounter, epoch: float) -> TrainerControl:
    control = TrainerControl()
    counter.on_epoch_begin(None, TrainerState(epoch=epoch), control)
    return control


def test_counts_reach_training_logs_per_epoch_and_the_closing_metrics():
    counter = SkippedImageCounter(min_decodable_fraction=0.5)
    control = begin_epoch(counter, 0)
    for decoded, skipped in [(8, 0), (6, 2), (8, 0)]:
        inputs = batch(decoded, skipped)
        counter.record(inputs)
        assert "skipped_images" not in inputs  # the model is never given it
    first_log, second_log = {"loss": 1.0}, {"loss": 1.0}
    counter.report(first_log)
    counter.record(batch(5, 3))
    counter.on_epoch_end(None, None, control)
    counter.report(second_log)
    assert (first_log["skipped_images"], second_log["skipped_images"]) == (2, 5)  # this epoch's, so far
    assert control.should_log  # the epoch's total is logged at its end

    begin_epoch(counter, 1)
    counter.record(batch(7, 1))
    third_log = {"loss": 1.0}
    counter.report(third_log)
    assert third_log["skipped_images"] == 1  # a new epoch counts from 0
    counter.on_epoch_end(None, None, TrainerControl())
    closing = {"train_runtime": 1.0, "train_loss": 1.0}
    counter.report(closing)
    assert closing["train_skipped_images"] == 6


def test_evaluation_counts_can_stop_the_run():
    counter = SkippedImageCounter(min_decodable_fraction=0.75)
    counter.report({"eval_top1": 0.5, "eval_images": 6, "eval_skipped_images": 2, "eval_runtime": 1.0})
    with pytest.raises(TooFewDecodableImagesError, match=r"Only 5 of the 8 images read in the evaluation"):
        counter.report({"test_top1": 0.5, "test_images": 5, "test_skipped_images": 3, "test_runtime": 1.0})


def test_decodable_fraction_is_checked_at_epoch_end_and_early_once_enough_images_were_read():
    counter = SkippedImageCounter(min_decodable_fraction=0.9)
    control = begin_epoch(counter, 0)
    counter.record(batch(2, 6))
    counter.report({"loss": 1.0})  # 8 images: too few to judge yet
    with pytest.raises(TooFewDecodableImagesError, match=r"Only 2 of the 8 images read in epoch 1 .*0\.9"):
        counter.on_epoch_end(None, None, control)

    counter = SkippedImageCounter(min_decodable_fraction=0.9)
    begin_epoch(counter, 2.5)  # resumed in the middle of its third epoch
    half = MIN_IMAGES_FOR_EARLY_CHECK // 2
    counter.record({"labels": torch.zeros(half), "skipped_images": torch.tensor([half])})
    with pytest.raises(TooFewDecodableImagesError, match=f"Only {half} of the {2 * half} images read in epoch 3"):
        counter.report({"loss": 1.0})

    lenient = SkippedImageCounter(min_decodable_fraction=0)
    lenient.record(batch(0, 8))
    lenient.on_epoch_end(None, None, begin_epoch(lenient, 0))  # 0 never stops


def with_garbage(split: datasets.Dataset, corrupt: set) -> datasets.Dataset:
    rows = split.cast_column("image", datasets.Image(decode=False)).to_list()
    for index in corrupt:
        rows[index]["image"] = {"bytes": GARBAGE, "path": f"corrupt-{index}.png"}
    return datasets.Dataset.from_list(rows, features=split.features)


def test_skips_are_summed_over_workers_into_logs_and_metrics(digits, random_teacher_dir, tmp_path):
    dataset = datasets.DatasetDict({
        "train": with_garbage(digits["train"].select(range(48)), {0, 5, 17, 30, 47}),
        "validation": with_garbage(digits["validation"].select(range(32)), {3, 4}),
    })
    dataset.save_to_disk(str(tmp_path / "data"))
    args = tiny_run_args(tmp_path / "data", random_teacher_dir, tmp_path / "out", "--num_train_epochs", "2",
                         "--repeated_aug", "false", "--logging_steps", "4", "--dataloader_num_workers", "2",
                         "--do_eval", "true", "--min_decodable_fraction", "0.8")
    trainer = main(args)

    train_metrics = json.loads((tmp_path / "out" / "train_results.json").read_text())
    assert train_metrics["train_skipped_images"] == 10  # 5 a epoch, from two worker processes
    assert json.loads((tmp_path / "out" / "eval_results.json").read_text())["eval_skipped_images"] == 2
    # 6 steps an epoch, logged at steps 4, 6 (the epoch's end), 8 and 12: the epoch so far, then its total.
    logged = [(entry["step"], entry["skipped_images"]) for entry in trainer.state.log_history if "loss" in entry]
    assert [step for step, _ in logged] == [4, 6, 8, 12] and [count for _, count in logged][1::2] == [5, 5]
    assert [entry["eval_skipped_images"] for entry in trainer.state.log_history if "eval_top1" in entry] == [2, 2, 2]


@pytest.mark.slow
def test_a_dataset_that_does_not_decode_stops_the_run_without_a_model(digits, random_teacher_dir, tmp_path):
    split = with_garbage(digits["train"].select(range(16)), set(range(16)))
    datasets.DatasetDict({"train": split, "validation": split}).save_to_disk(str(tmp_path / "data"))
    args = tiny_run_args(tmp_path / "data", random_teacher_dir, tmp_path / "out", "--num_train_epochs", "1",
                         "--repeated_aug", "false", "--eval_strategy", "no")
    with pytest.raises(TooFewDecodableImagesError, match="Only 0 of the 16 images read in epoch 1"):
        main(args)
    assert not (tmp_path / "out" / "model.safetensors").exists()


@pytest.mark.slow
def test_an_evaluation_where_nothing_decodes_stops_the_run(digits, random_teacher_dir, tmp_path):
    datasets.DatasetDict({
        "train": digits["train"].select(range(16)),
        "validation": with_garbage(digits["validation"].select(range(12)), set(range(12))),
    }).save_to_disk(str(tmp_path / "data"))
    args = tiny_run_args(tmp_path / "data", random_teacher_dir, tmp_path / "out", "--max_steps", "1",
                         "--eval_strategy", "no", "--do_eval", "true", "--per_device_eval_batch_size", "8")
    with pytest.raises(TooFewDecodableImagesError, match="Only 0 of the 12 images read in the evaluation"):
        main(args)


# Streamed, each process reads its own half of the train stream (6 steps x 4 = 24 images each), and process 0 reads
# the validation stream and dispatches its batches, whose blank rows for skipped images keep them divisible.
@pytest.mark.parametrize("reading", [[], ["--streaming", "true", "--shuffle_buffer_size", "0", "--max_steps", "6"]],
                         ids=["map-style", "streamed"])
@pytest.mark.slow
def test_two_processes_sum_their_skips_and_evaluate_as_one(digits, random_teacher_dir, tmp_path, reading):
    datasets.DatasetDict({
        "train": with_garbage(digits["train"].select(range(48)), {0, 5, 17, 30, 47}),
        "validation": with_garbage(digits["validation"].select(range(37)), {0, 3, 20, 33}),
    }).save_to_disk(str(tmp_path / "data"))
    # 48 = 6 steps x 2 processes x 4: no training batch is padded with repeated images to even the processes out
    # (accelerate's even_batches), which would be read, and counted, twice. The validation's 37 = 16 + 16 + 5 are:
    # process 0 images 0-15 (2 corrupt) beside process 1's 16-31 (1 corrupt), then 32-36 padded with 0-10 (so the
    # corrupt 0 and 3 again) beside a batch of repeats; those repeats are not evaluated, nor counted.
    args = tiny_run_args(tmp_path / "data", random_teacher_dir, tmp_path / "out", "--num_train_epochs", "1",
                         "--repeated_aug", "false", "--eval_strategy", "no", "--do_eval", "true",
                         "--min_decodable_fraction", "0.8", "--dataloader_num_workers", "1", *reading)
    args[args.index("--per_device_train_batch_size") + 1] = "4"
    args[args.index("--per_device_eval_batch_size") + 1] = "16"
    stdout = run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
         "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())],
        args, tmp_path / "saves",
    )
    assert "WORLD_SIZE 2" in stdout
    assert json.loads((tmp_path / "out" / "train_results.json").read_text())["train_skipped_images"] == 5

    # The trained model evaluated again on one process, map-style: the same images, counts, accuracies and loss.
    student, map_style = args.index("--model_preset"), len(args) - len(reading)
    one_process = [*args[:student], *args[student + 4:map_style], "--do_train", "false", "--model_name_or_path",
                   str(tmp_path / "out"), "--output_dir", str(tmp_path / "one")]  # without its preset and overrides
    main(one_process)
    two, one = (json.loads((tmp_path / run_dir / "eval_results.json").read_text()) for run_dir in ("out", "one"))
    assert (two["eval_images"], two["eval_skipped_images"]) == (33, 4)  # and the same on one process, below
    timings = ("epoch", "eval_runtime", "eval_samples_per_second", "eval_steps_per_second",
               "eval_model_preparation_time")
    two, one = ({name: value for name, value in metrics.items() if name not in timings} for metrics in (two, one))
    assert {"eval_top1", "eval_cls_top1", "eval_dist_top1", "eval_teacher_top1"} <= one.keys()
    assert two.pop("eval_loss") == pytest.approx(one.pop("eval_loss"), rel=1e-5)
    assert two.pop("eval_token_cosine") == pytest.approx(one.pop("eval_token_cosine"), rel=1e-5)
    assert two == one


@pytest.mark.slow
def test_a_stream_on_one_process_counts_batches_where_nothing_decoded(digits, random_teacher_dir, tmp_path):
    # accelerate dispatches a stream's batches even on one process, slicing each by its number of decoded images:
    # the count of a batch where none decoded was lost (0 skipped, and --min_decodable_fraction never stopped a run).
    datasets.DatasetDict({
        "train": with_garbage(digits["train"].select(range(32)), set(range(16))),  # the first 2 of 4 batches
        "validation": with_garbage(digits["validation"].select(range(16)), {0, 1, 2, 3, 4, 5, 6, 7}),
    }).save_to_disk(str(tmp_path / "data"))
    args = tiny_run_args(tmp_path / "data", random_teacher_dir, tmp_path / "out", "--streaming", "true",
                         "--shuffle_buffer_size", "0", "--max_steps", "4", "--repeated_aug", "false",
                         "--eval_strategy", "no", "--do_eval", "true", "--per_device_eval_batch_size", "8")
    main([*args, "--min_decodable_fraction", "0.4"])
    assert json.loads((tmp_path / "out" / "train_results.json").read_text())["train_skipped_images"] == 16
    assert json.loads((tmp_path / "out" / "eval_results.json").read_text())["eval_skipped_images"] == 8
    with pytest.raises(TooFewDecodableImagesError, match="Only 16 of the 32 images read in epoch 1"):
        main([*args, "--min_decodable_fraction", "0.9", "--output_dir", str(tmp_path / "stopped")])
