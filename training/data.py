"""Load an image classification dataset into train/validation splits with validated labels.

Sources: a Hub dataset, local parquet/arrow files, a `save_to_disk` directory, or imagefolder directories.
Images stay undecoded (`datasets.Image(decode=False)`) so that decoding happens in the DataLoader workers, in
`training.transforms.ImageTransform`, and never in the main process.
"""

import logging
import os
from functools import partial
from typing import NamedTuple

import datasets
from datasets.distributed import split_dataset_by_node

from . import labels
from .args import DataArguments, is_meant_as_local_path

logger = logging.getLogger(__name__)

IMAGE_COLUMN_NAMES = ("image", "img", "jpg", "png", "pixel_values")
LABEL_COLUMN_NAMES = ("label", "labels", "cls")
# Fixed so that every process and every rerun carves off the same validation examples.
VALIDATION_SPLIT_SEED = 42
_LOCAL_FILE_BUILDERS = {".parquet": "parquet", ".arrow": "arrow"}

AnyDatasetDict = datasets.DatasetDict | datasets.IterableDatasetDict
AnyDataset = datasets.Dataset | datasets.IterableDataset


class ImageDatasets(NamedTuple):
    """What `load_image_datasets` returns: the `train`/`validation` splits and what the model config needs."""

    dataset_dict: AnyDatasetDict
    image_column: str
    label_column: str
    label_names: list[str]

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.label_names))

    @property
    def label2id(self) -> dict[str, int]:
        return {name: index for index, name in enumerate(self.label_names)}


def load_image_datasets(data_args: DataArguments) -> ImageDatasets:
    """Load the splits named by `data_args`, find the image and label columns and check every label.

    Returns `train` and `validation` splits (the latter carved off train when the dataset has none) holding only the
    image column, cast to `datasets.Image(decode=False)`, and the label column. The classes are the `ClassLabel`'s
    (train and validation must name the same ones), else `--num_labels`, else the largest train label + 1 provided
    at least half of those ids occur. Labels outside `[0, num_classes)` raise a `ValueError` naming the split and the
    value before training; when streaming, they raise when they are met.
    """
    raw = _load_raw(data_args)
    if data_args.train_split not in raw:
        raise ValueError(f"Split '{data_args.train_split}' not found; the dataset has splits {list(raw)}.")
    train = raw[data_args.train_split]
    features = train.features
    if features is None:
        raise ValueError("The dataset does not declare its features, so its image and label columns are unknown.")
    image_column = _find_column(
        features, data_args.image_column, datasets.Image, IMAGE_COLUMN_NAMES, "image", "image_column"
    )
    label_column = _find_column(
        features, data_args.label_column, datasets.ClassLabel, LABEL_COLUMN_NAMES, "label", "label_column"
    )
    _check_image_feature(features[image_column], image_column)
    label_names = labels.label_names(train, features[label_column], label_column, data_args)
    labels.refuse_a_single_class(train, label_names, label_column, data_args)
    prepare = partial(
        _prepare_split, image_column=image_column, label_column=label_column, num_classes=len(label_names),
        streaming=data_args.streaming,
    )

    train = prepare(train, data_args.train_split)
    if data_args.validation_split in raw:
        validation = raw[data_args.validation_split]
        labels.check_same_classes(features, validation.features, label_column, data_args)
        validation = prepare(validation, data_args.validation_split)
    elif data_args.streaming:
        raise ValueError(
            f"Split '{data_args.validation_split}' not found (splits: {list(raw)}), and a streamed dataset cannot be "
            "carved; pass --validation_split with one of them."
        )
    else:
        carved = train.train_test_split(test_size=data_args.validation_split_percentage / 100,
                                        seed=VALIDATION_SPLIT_SEED)
        train, validation = carved["train"], carved["test"]
        logger.info(
            "No '%s' split: holding out %s%% of '%s' (%d examples) for evaluation.", data_args.validation_split,
            data_args.validation_split_percentage, data_args.train_split, len(validation),
        )

    dict_class = datasets.IterableDatasetDict if data_args.streaming else datasets.DatasetDict
    splits = dict_class(
        train=_first(train, data_args.max_train_samples), validation=_first(validation, data_args.max_eval_samples)
    )
    return ImageDatasets(splits, image_column, label_column, label_names)


def attach_transform(dataset: AnyDataset, transform) -> AnyDataset:
    """Run `transform` (a batch-dict callable such as `ImageTransform`) lazily, when examples are read."""
    if isinstance(dataset, datasets.IterableDataset):
        return dataset.map(transform, batched=True, remove_columns=dataset.column_names)
    return dataset.with_transform(transform)


def prepare_train_stream(
    dataset: datasets.IterableDataset, data_args: DataArguments, rank: int, world_size: int, num_workers: int,
    seed: int, own_part: bool,
) -> datasets.IterableDataset:
    """The streamed train split as `training.train` reads it: this process's own part when `own_part`
    (`split_stream_by_process`), shuffled (`shuffle_stream`). Call it before `attach_transform`."""
    if own_part:
        dataset = split_stream_by_process(dataset, rank, world_size, num_workers)
    return shuffle_stream(dataset, seed, data_args.shuffle_buffer_size)


def split_stream_by_process(
    dataset: datasets.IterableDataset, rank: int, world_size: int, num_workers: int
) -> datasets.IterableDataset:
    """This process's part of a streamed split, each example in one process's part. Split before `attach_transform`,
    so that each process decodes only its own examples.

    When the shards (files) divide among the processes, each process reads only its own shards
    (`datasets.distributed.split_dataset_by_node`); otherwise every process reads them all and keeps every
    `world_size`-th example before decoding it. A process's DataLoader workers then share its shards: a worker
    without one stays idle, which is logged.
    """
    if dataset.num_shards % world_size == 0:
        part = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
        logger.info("Streaming on %d processes: each reads %d of the %d shards.", world_size, part.num_shards,
                    dataset.num_shards)
    else:
        # Not `split_dataset_by_node`: it would drop the other processes' examples after the whole pipeline, the
        # image transform attached later included, so each process would decode every example. The index counts
        # the examples of each DataLoader worker's shards, which are the same in every process.
        part = dataset.filter(_is_own_example, with_indices=True, fn_kwargs=dict(rank=rank, world_size=world_size))
        logger.warning(
            "Streaming on %d processes: %d shards do not divide among them, so each process reads all of them and "
            "keeps (and decodes) every %d-th example; a multiple of %d shards (files) saves the reading.",
            world_size, dataset.num_shards, world_size, world_size,
        )
    if part.num_shards < num_workers:
        logger.warning(
            "Streaming: %d shard(s) per process for %d DataLoader workers, which split a process's part by shards: "
            "%d of them stay idle. More shards (files) use them all.", part.num_shards, num_workers,
            num_workers - part.num_shards,
        )
    return part


def shuffle_stream(dataset: datasets.IterableDataset, seed: int, buffer_size: int) -> datasets.IterableDataset:
    """A streamed train split shuffled: the shards' order redrawn each epoch from `seed` (the same on every process,
    so `split_stream_by_process`'s parts stay disjoint), and the examples through a buffer of `buffer_size` per
    DataLoader worker; `buffer_size` 0 keeps the files' order.

    The buffer is filled from one shard at a time. datasets can interleave several (timm's reader does), but then
    pauses 5 s each time the interleaved shards close (`datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN`, apache/arrow
    #45214): once per epoch and DataLoader worker, a stall of every epoch's end.
    """
    if buffer_size == 0:
        logger.warning("--shuffle_buffer_size 0: the train stream is read in the same order every epoch.")
        return dataset
    return dataset.shuffle(seed=seed, buffer_size=buffer_size, max_buffer_input_shards=1)


def _is_own_example(example: dict, index: int, rank: int, world_size: int) -> bool:
    return index % world_size == rank


def _check_paths(data_args: DataArguments) -> None:
    """Name a missing or empty dataset path (a `ValueError`): datasets would fail without naming it."""
    for flag in ("train_dir", "validation_dir"):
        directory = getattr(data_args, flag)
        if directory is not None and not os.path.isdir(directory):
            raise ValueError(f"--{flag} {directory!r}: no such directory.")
        if directory is not None and not _class_directories(directory):
            raise ValueError(f"--{flag} {directory!r} holds no class directories (one sub-directory per class).")
    name = data_args.dataset_name
    if name is not None and not os.path.exists(name) and is_meant_as_local_path(name):
        raise ValueError(f"--dataset_name {name!r}: no such file or directory (nor a Hub dataset id).")


def _load_raw(data_args: DataArguments) -> AnyDatasetDict:
    _check_paths(data_args)
    load_kwargs = dict(cache_dir=data_args.cache_dir, streaming=data_args.streaming)
    if data_args.train_dir is not None:
        data_files = {data_args.train_split: os.path.join(data_args.train_dir, "**")}
        if data_args.validation_dir is not None:
            # datasets names the classes of both directories together: a validation class that train lacks would
            # become a class the model never trains on (a validation subset of train's classes is fine)
            train_names, validation_names = map(_class_directories, (data_args.train_dir, data_args.validation_dir))
            if set(validation_names) - set(train_names):
                labels.refuse_different_names(train_names, validation_names,
                                        "the class directories of --train_dir and --validation_dir", data_args)
            data_files[data_args.validation_split] = os.path.join(data_args.validation_dir, "**")
        return datasets.load_dataset("imagefolder", data_files=data_files, **load_kwargs)

    name = data_args.dataset_name
    if os.path.isdir(name) and _is_saved_to_disk(name):
        loaded = datasets.load_from_disk(name)
        if isinstance(loaded, datasets.Dataset):
            loaded = datasets.DatasetDict({data_args.train_split: loaded})
        if data_args.streaming:
            return datasets.IterableDatasetDict({split: ds.to_iterable_dataset() for split, ds in loaded.items()})
        return loaded
    if os.path.isfile(name):
        suffix = os.path.splitext(name)[1].lower()
        if suffix not in _LOCAL_FILE_BUILDERS:
            raise ValueError(f"Cannot load '{name}': local files must end in one of {list(_LOCAL_FILE_BUILDERS)}.")
        return datasets.load_dataset(
            _LOCAL_FILE_BUILDERS[suffix], data_files={data_args.train_split: name}, **load_kwargs
        )
    # A Hub id, or a local directory of data files whose names tell the splits (`train-00000-of-00004.parquet`).
    if os.path.isdir(name):
        labels.check_declared_classes(name, data_args)
    return datasets.load_dataset(name, data_args.dataset_config_name, **load_kwargs)


def _class_directories(directory: str) -> list[str]:
    return sorted(entry.name for entry in os.scandir(directory) if entry.is_dir() and not entry.name.startswith("."))


def _is_saved_to_disk(directory: str) -> bool:
    return any(os.path.isfile(os.path.join(directory, marker)) for marker in ("dataset_dict.json", "state.json"))


def _prepare_split(
    dataset: AnyDataset, split: str, image_column: str, label_column: str, num_classes: int, streaming: bool
) -> AnyDataset:
    """Keep the two columns, leave the images undecoded, and check the labels (now, or as they stream by)."""
    dataset = dataset.select_columns([image_column, label_column])
    dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    if streaming:
        check = partial(labels.check_streamed_labels, split=split, column=label_column, num_classes=num_classes)
        return dataset.map(check, batched=True)
    labels.check_label_range(dataset, split, label_column, num_classes)
    return dataset


def _find_column(
    features: datasets.Features,
    requested: str | None,
    feature_type: type,
    known_names: tuple[str, ...],
    role: str,
    flag: str,
) -> str:
    """The requested column, else the only column of `feature_type`, else the only one with a known name."""
    columns = list(features)
    if requested is not None:
        if requested not in features:
            raise ValueError(f"No column '{requested}' (--{flag}); the dataset has columns {columns}.")
        return requested
    typed = [column for column, feature in features.items() if isinstance(feature, feature_type)]
    named = [column for column in columns if column.lower() in known_names]
    candidates = typed or named
    if len(candidates) > 1:
        # Several typed columns (e.g. an image and a mask): a conventional name breaks the tie.
        candidates = [column for column in candidates if column in named] or candidates
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise ValueError(
            f"No {role} column found: no column has a {feature_type.__name__} feature or is named one of "
            f"{list(known_names)}; the dataset has columns {columns}. Pass --{flag}."
        )
    raise ValueError(f"Several columns could hold the {role}s: {candidates} (columns: {columns}). Pass --{flag}.")


def _check_image_feature(feature, column: str) -> None:
    # Encoded bytes and file paths cast to `Image(decode=False)`; anything else would need a conversion we can't guess.
    if isinstance(feature, datasets.Image):
        return
    if isinstance(feature, datasets.Value) and feature.dtype in ("binary", "large_binary", "string", "large_string"):
        return
    raise ValueError(
        f"Image column '{column}' holds {feature}; expected an Image feature, encoded image bytes or file paths."
    )


def _first(dataset: AnyDataset, count: int | None) -> AnyDataset:
    if count is None:
        return dataset
    if isinstance(dataset, datasets.IterableDataset):
        return dataset.take(count)
    return dataset.select(range(min(count, len(dataset))))
