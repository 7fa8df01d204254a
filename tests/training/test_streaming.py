"""`--streaming` on 2 processes (gloo on CPU): each process reads and decodes its own part of the stream, each
example is trained on once per epoch, the processes end their epochs together and evaluation counts each example
once."""

import io
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest

from training.argument_checks import check_stream_dispatch
from training.data import shuffle_stream, split_stream_by_process

from .conftest import tiny_run_args
from .test_distributed import launch, two_processes

STREAM_PROBE = Path(__file__).with_name("stream_probe.py")
NUM_TRAIN, NUM_VALIDATION = 29, 13


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_stream(digits, directory: Path, shard_sizes: list[int]) -> Path:
    """`NUM_TRAIN` train digits in parquet files of `shard_sizes`, and `NUM_VALIDATION` validation digits in one; each
    example's label is its id (one class per train example) and its image path `<split>-<id>.png`."""
    features = datasets.Features(
        image=datasets.Image(), label=datasets.ClassLabel(names=[str(index) for index in range(NUM_TRAIN)])
    )

    def rows(split, ids):
        return [{"image": {"bytes": png_bytes(digits["train"][index % 64]["image"]), "path": f"{split}-{index}.png"},
                 "label": index} for index in ids]

    directory.mkdir()
    start = 0
    for shard, size in enumerate(shard_sizes):
        datasets.Dataset.from_list(rows("train", range(start, start + size)), features=features).to_parquet(
            str(directory / f"train-{shard:05d}-of-{len(shard_sizes):05d}.parquet"))
        start += size
    assert start == NUM_TRAIN
    datasets.Dataset.from_list(rows("validation", range(NUM_VALIDATION)), features=features).to_parquet(
        str(directory / "validation-00000-of-00001.parquet"))
    return directory


def read(probe_dir: Path, name: str, rank: int) -> list[list[str]]:
    path = probe_dir / f"{name}-{rank}"
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.parametrize(
    "shard_sizes, batch_size, workers",
    [
        ([12, 4, 8, 5], 4, 0),  # 2 shards each: 20 and 9 examples, 5 and 3 batches
        ([10, 10, 9], 2, 2),  # 3 shards: every other example, 15 and 14, in 2 workers each
    ],
    ids=["4-shards", "3-shards"],
)
@pytest.mark.slow
def test_each_process_decodes_its_own_part_and_sees_each_example_once_per_epoch(
    digits, tmp_path, shard_sizes, batch_size, workers
):
    data_dir = write_stream(digits, tmp_path / "data", shard_sizes)
    probe_dir = tmp_path / "probe"
    probe_dir.mkdir()
    args = tiny_run_args(data_dir, None, tmp_path / "out", "--streaming", "true",
                         "--distillation_type", "none", "--max_steps", "100", "--logging_steps", "1",
                         "--save_strategy", "no", "--eval_strategy", "epoch", "--per_device_eval_batch_size", "4",
                         "--dataloader_num_workers", str(workers))
    args[args.index("--per_device_train_batch_size") + 1] = str(batch_size)
    result = launch(two_processes(), STREAM_PROBE, args, STREAM_PROBE_DIR=str(probe_dir), STOP_AFTER_EPOCHS="2")
    assert result.returncode == 0, result.stderr[-3000:]

    everything = Counter(map(str, range(NUM_TRAIN)))
    for epoch in ("0", "1"):
        parts = [Counter(label for seen_epoch, label in read(probe_dir, "seen", rank) if seen_epoch == epoch)
                 for rank in (0, 1)]
        assert parts[0] + parts[1] == everything, epoch  # each example once, across the processes
        assert parts[0] and parts[1]
    for rank in (0, 1):
        decoded = Counter(path for split, path in read(probe_dir, "decoded", rank) if split == "train")
        seen = Counter(f"train-{label}.png" for _, label in read(probe_dir, "seen", rank))
        assert decoded == seen, rank  # decoded only what it trained on, once each
        # the evaluations after each epoch and the closing one each counted every validation example once
        assert read(probe_dir, "eval", rank) == [list(map(str, range(NUM_VALIDATION)))] * 3, rank


def test_split_stream_by_process_gives_each_example_to_one_process(digits, tmp_path, caplog):
    stream = datasets.load_dataset(str(write_stream(digits, tmp_path / "data", [10, 10, 9])), split="train",
                                   streaming=True)
    parts = [[example["label"] for example in split_stream_by_process(stream, rank, 2, num_workers=4)]
             for rank in (0, 1)]
    assert sorted(parts[0] + parts[1]) == list(range(NUM_TRAIN)) and len(parts[0]) == 15
    assert "3 shards do not divide among them" in caplog.text and "2 of them stay idle" not in caplog.text
    assert "3 shard(s) per process for 4 DataLoader workers" in caplog.text


def test_the_train_stream_is_shuffled_each_epoch_the_same_on_every_process(digits, tmp_path, caplog):
    stream = datasets.load_dataset(str(write_stream(digits, tmp_path / "data", [10, 10, 9])), split="train",
                                   streaming=True).select_columns(["label"])
    in_files = list(range(NUM_TRAIN))

    def epoch_order(rank: int, epoch: int) -> list[int]:
        shuffled = shuffle_stream(split_stream_by_process(stream, rank, 2, num_workers=0), seed=0, buffer_size=8)
        shuffled.set_epoch(epoch)
        return [example["label"] for example in shuffled]

    for epoch in (0, 1):
        parts = [epoch_order(rank, epoch) for rank in (0, 1)]
        assert sorted(parts[0] + parts[1]) == in_files, epoch  # each example once, across the processes
    assert epoch_order(0, 0) != sorted(epoch_order(0, 0)) and epoch_order(0, 0) != epoch_order(0, 1)
    assert epoch_order(1, 1) == epoch_order(1, 1)  # reproducible from the seed
    assert [example["label"] for example in shuffle_stream(stream, 0, 0)] == in_files
    assert "read in the same order every epoch" in caplog.text


def _stream_run(dispatch_batches, world_size=2, evaluates=True):
    data_args = SimpleNamespace(streaming=True)
    training_args = SimpleNamespace(
        world_size=world_size, do_eval=evaluates, eval_strategy="no",
        accelerator_config=SimpleNamespace(dispatch_batches=dispatch_batches),
    )
    return data_args, training_args


def test_a_dispatched_train_stream_on_several_processes_is_refused_as_it_would_drop_images():
    # accelerate splits a dispatched batch of 31 decoded images on 2 processes as 15 + 15: one image lost per batch.
    with pytest.raises(ValueError, match="dispatch_batches=true with --streaming on several processes: .* drops the "
                                         "remainder"):
        check_stream_dispatch(*_stream_run(dispatch_batches=True))
    with pytest.raises(ValueError, match="dispatch_batches=false .* the evaluation stream"):
        check_stream_dispatch(*_stream_run(dispatch_batches=False))
    check_stream_dispatch(*_stream_run(dispatch_batches=None))  # the default: each process reads its own part
    check_stream_dispatch(*_stream_run(dispatch_batches=False, evaluates=False))
    check_stream_dispatch(*_stream_run(dispatch_batches=True, world_size=1))  # one process keeps every image
