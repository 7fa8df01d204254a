"""Input throughput on N processes: `--streaming` (each process reads and decodes its own part) vs map-style.

Both load the same parquet shards of real JPEGs (`benchmarks.input_pipeline.write_jpegs`) with
`training.data.load_image_datasets` and the recipe's training transform, and iterate one epoch of
`DistillationTrainer`'s own train DataLoader in each of `num_processes` processes (`accelerate launch`, gloo on
the CPU), through `get_batch_samples` as the training loop does, with no model step: the figure is the images per
second all processes together receive, decoded and augmented, from the same number of DataLoader workers each,
until the last batch; the wait from there to the epoch's end is its own column (`epoch_end_wait_s`).
"""

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import datasets
import pyarrow.parquet as pq

from . import Measurement
from .input_pipeline import IMAGE_SIZE, JPEG_QUALITY, write_jpegs

MAP_STYLE, STREAMED, DISPATCHED = "map-style", "streamed", "streamed, dispatched from process 0"
REPO = Path(__file__).resolve().parents[1]


def write_shards(directory: Path, num_images: int, num_shards: int) -> Path:
    """`num_images` JPEGs as `num_shards` train parquet files and a one-image validation file under `data/`."""
    _, parquet = write_jpegs(directory, num_images)
    images = datasets.Dataset.from_parquet(str(parquet), cache_dir=str(directory / "cache"))
    data = directory / "data"
    data.mkdir(exist_ok=True)
    for index in range(num_shards):
        images.shard(num_shards, index, contiguous=True).to_parquet(
            str(data / f"train-{index:05d}-of-{num_shards:05d}.parquet"))
    images.select([0]).to_parquet(str(data / "validation-00000-of-00001.parquet"))
    return data


def run(
    directory: str | os.PathLike,
    num_images: int = 256,
    num_shards: int = 4,
    num_processes: int = 2,
    num_workers: int = 2,
    input_size: int = 224,
    batch_size: int = 32,
    warmup: int = 1,
    repeats: int = 3,
) -> Iterator[Measurement]:
    """Yield the img/s all `num_processes` processes receive per epoch: map-style, streamed, streamed and
    dispatched; the streamed rows carry their ratio to map-style."""
    data = write_shards(Path(directory), num_images, num_shards)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
        "-m", "benchmarks.streaming", str(data), str(input_size), str(batch_size), str(num_workers),
        str(warmup + repeats),
    ]
    # The input pipeline is the CPU's: without a GPU accelerate forms a gloo group.
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    if result.returncode != 0:
        raise RuntimeError(f"The {num_processes}-process input benchmark failed:\n{result.stderr[-3000:]}")
    seconds = json.loads(result.stdout.strip().splitlines()[-1])
    case = (f"recipe train transform {input_size}px, {num_images} JPEGs {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} "
            f"q{JPEG_QUALITY} in {num_shards} shards, {num_processes} processes x {num_workers} workers")
    medians = {name: statistics.median(delivering for delivering, _ in values[warmup:])
               for name, values in seconds.items()}
    for name, median in medians.items():
        extra = {"epoch_end_wait_s": statistics.median(wait for _, wait in seconds[name][warmup:])}
        if name != MAP_STYLE:
            extra["ratio_vs_map-style"] = medians[MAP_STYLE] / median
        yield Measurement("stream", case, name, num_images / median, median, repeats, extra=extra)


def _epoch_seconds(data_dir: str, contender: str, input_size: int, batch_size: int, num_workers: int) -> list[float]:
    """One epoch of this process's train DataLoader: the slowest process's seconds until its last batch, and from
    there until the epoch's end."""
    import torch
    from transformers import TrainingArguments

    from deit_hf import DeiTConfig, DeiTForImageClassificationWithTeacher
    from training.args import AugmentationArguments, DataArguments
    from training.collator import DistillationCollator
    from training.data import attach_transform, load_image_datasets, prepare_train_stream
    from training.trainer import DistillationTrainer
    from training.transforms import ImageTransform, build_train_transform

    with tempfile.TemporaryDirectory() as output_dir:
        args = TrainingArguments(output_dir, per_device_train_batch_size=batch_size, dataloader_num_workers=num_workers,
                                 remove_unused_columns=False, report_to=[], use_cpu=True, max_steps=1)
        data_args = DataArguments(dataset_name=data_dir, streaming=contender != MAP_STYLE, cache_dir=output_dir)
        data = load_image_datasets(data_args)
        train, own_stream_part = data.dataset_dict["train"], contender == STREAMED
        if data_args.streaming:
            train = prepare_train_stream(train, data_args, args.process_index, args.world_size, num_workers, args.seed,
                                         own_stream_part)
        transform = ImageTransform(build_train_transform(AugmentationArguments(input_size=input_size)))
        model = DeiTForImageClassificationWithTeacher(DeiTConfig(  # never run: the trainer needs one
            image_size=input_size, patch_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=1,
            intermediate_size=32, num_labels=len(data.label_names), distillation_type="none"))
        trainer = DistillationTrainer(model=model, args=args, train_dataset=attach_transform(train, transform),
                                      data_collator=DistillationCollator(), own_stream_part=own_stream_part)
        loader = trainer.get_train_dataloader()
        torch.distributed.barrier()
        start = time.perf_counter()
        iterator, images = iter(loader), 0
        while batches := trainer.get_batch_samples(iterator, 1, args.device)[0]:
            images += sum(len(batch["labels"]) for batch in batches)
            last_batch = time.perf_counter()
        # (until the iterator ends: the epoch-end wait, datasets' pause when a shuffle buffer's interleaved shards
        # close, SLEEP_TIME_ON_THREADS_SHUTDOWN, 5 s per epoch and worker)
        seconds = torch.tensor([last_batch - start, time.perf_counter() - last_batch])
    torch.distributed.all_reduce(seconds, op=torch.distributed.ReduceOp.MAX)
    total = torch.tensor(images)
    torch.distributed.all_reduce(total)
    expected = sum(pq.ParquetFile(path).metadata.num_rows for path in Path(data_dir).glob("train-*.parquet"))
    if total != expected:
        raise RuntimeError(f"An epoch delivered {int(total)} images instead of {expected}.")
    return seconds.tolist()


if __name__ == "__main__":
    data_dir, input_size, batch_size, num_workers, rounds = sys.argv[1], *map(int, sys.argv[2:])
    timings = {MAP_STYLE: [], STREAMED: [], DISPATCHED: []}
    for _ in range(rounds):  # interleaved, so that a busy spell of the machine hits both
        for name in timings:
            timings[name].append(_epoch_seconds(data_dir, name, input_size, batch_size, num_workers))
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(timings))
