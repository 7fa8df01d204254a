"""The label checks of `training.data`: the classes a dataset names, and what would make its labels mean nothing.

A label column of one class, train and validation splits that name their classes differently (which `datasets` would
cast one onto the other silently), a validation split without the label column, labels missing (null: `datasets` fills
the column of a data file that lacks it with nulls) and labels outside the classes are refused with a message naming
the split, column and values.
"""

import logging

import datasets
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from datasets.data_files import DataFilesDict, get_data_patterns

from .args import DataArguments

logger = logging.getLogger(__name__)

_UNLABELED_HINT = " (-1 marks unlabeled examples, such as those of ImageNet's test split.)"
_MISSING_HINT = "a data file of the split lacks the column, which datasets fills with nulls, or leaves it empty"


def check_declared_classes(directory: str, data_args: DataArguments) -> None:
    """Refuse a directory of parquet/arrow files whose train and validation files declare different ClassLabels:
    datasets would cast the validation labels to the train names index by index, silently."""
    files = DataFilesDict.from_patterns(get_data_patterns(directory), base_path=directory)
    if data_args.train_split not in files or data_args.validation_split not in files:
        return
    train, validation = (_declared_features(files[split][0]) for split in (data_args.train_split,
                                                                           data_args.validation_split))
    for column, feature in train.items():
        other = validation.get(column)
        if isinstance(feature, datasets.ClassLabel) and isinstance(other, datasets.ClassLabel):
            refuse_different_names(feature.names, other.names, f"column '{column}'", data_args)


def _declared_features(path: str) -> datasets.Features:
    """The features a parquet or arrow file declares in its schema's metadata; none for other files."""
    if path.endswith(".parquet"):
        schema = pq.read_schema(path)
    elif path.endswith(".arrow"):
        with pa.memory_map(path) as file:
            schema = pa.ipc.open_stream(file).schema
    else:
        return datasets.Features()
    return datasets.Features.from_arrow_schema(schema)


def label_names(
    train: datasets.Dataset | datasets.IterableDataset, feature, column: str, data_args: DataArguments
) -> list[str]:
    num_labels = data_args.num_labels
    if not data_args.streaming:
        refuse_missing_labels(label_array(train, column), data_args.train_split, column)
    if isinstance(feature, datasets.ClassLabel):
        if num_labels is not None and num_labels != feature.num_classes:
            raise ValueError(
                f"--num_labels {num_labels} contradicts label column '{column}', whose ClassLabel names "
                f"{feature.num_classes} classes."
            )
        return list(feature.names)
    if not (isinstance(feature, datasets.Value) and pa.types.is_integer(feature.pa_type)):
        raise ValueError(f"Label column '{column}' holds {feature}; expected integer class ids or a ClassLabel.")
    if num_labels is None:
        num_labels = _count_classes(train, column, data_args)
    logger.warning(
        "Label column '%s' has no ClassLabel feature: naming its %d classes '0'..'%d' (%s).", column, num_labels,
        num_labels - 1, "--num_labels" if data_args.num_labels else "the largest train label + 1; --num_labels sets it",
    )
    return [str(index) for index in range(num_labels)]


def _count_classes(train: datasets.Dataset | datasets.IterableDataset, column: str, data_args: DataArguments) -> int:
    """The largest train label + 1, unless that label is far beyond the others (a typo would size the model)."""
    if data_args.streaming:
        raise ValueError(
            f"Label column '{column}' has no ClassLabel feature, so the number of classes of a streamed dataset is "
            "unknown; pass --num_labels, cast the column to a ClassLabel, or do not stream."
        )
    labels = label_array(train, column)
    valid = pc.filter(labels, pc.greater_equal(labels, 0))
    largest = pc.max(valid).as_py()
    if largest is None:
        raise ValueError(
            f"Label column '{column}' of split '{data_args.train_split}' holds no valid class id (max: "
            f"{pc.max(labels).as_py()}).{_UNLABELED_HINT}"
        )
    present = pc.count_distinct(valid).as_py()
    if largest + 1 > 2 * present:
        below = pc.max(pc.filter(valid, pc.less(valid, largest))).as_py()
        raise ValueError(
            f"Split '{data_args.train_split}': label {largest} in column '{column}' would make {largest + 1} classes "
            f"of which only {present} occur (the next largest label is {below}). Pass --num_labels with the real "
            "number of classes (labels outside are then refused and named), or fix the label."
        )
    return largest + 1


def check_same_classes(
    train_features: datasets.Features, validation_features, column: str, data_args: DataArguments
) -> None:
    train_feature = train_features[column]
    validation_feature = (validation_features or {}).get(column)
    if validation_features is not None and validation_feature is None:
        raise ValueError(
            f"Split '{data_args.validation_split}' has no label column '{column}' (its columns: "
            f"{list(validation_features)}); evaluation needs the labels. Pass --validation_split with a labelled split."
        )
    if isinstance(train_feature, datasets.ClassLabel) and isinstance(validation_feature, datasets.ClassLabel):
        refuse_different_names(train_feature.names, validation_feature.names, f"column '{column}'", data_args)


def refuse_different_names(train_names: list[str], validation_names: list[str], where: str, data_args) -> None:
    if list(train_names) == list(validation_names):
        return
    index = next((index for index, (a, b) in enumerate(zip(train_names, validation_names, strict=False)) if a != b),
                 min(len(train_names), len(validation_names)))
    name = lambda names: repr(names[index]) if index < len(names) else "absent"  # noqa: E731
    raise ValueError(
        f"Splits '{data_args.train_split}' and '{data_args.validation_split}' name their classes differently in "
        f"{where} ({len(train_names)} and {len(validation_names)} classes; class {index} is {name(train_names)} and "
        f"{name(validation_names)}): the same label would mean different classes. {data_args.train_split}: "
        f"{_listed(train_names)}; {data_args.validation_split}: {_listed(validation_names)}."
    )


def _listed(names: list[str], shown: int = 20) -> str:
    return "[" + ", ".join(map(str, names[:shown])) + (f", ... ({len(names)} in all)]" if len(names) > shown else "]")


def refuse_a_single_class(
    train: datasets.Dataset | datasets.IterableDataset, label_names: list[str], column: str, data_args: DataArguments
) -> None:
    """A model of one class, or trained on one class only, reaches loss 0 at once and learns nothing."""
    if len(label_names) < 2:
        found = f"names a single class ({', '.join(map(repr, label_names))})"
    elif not data_args.streaming and pc.count_distinct(label_array(train, column)).as_py() < 2:
        found = f"holds a single one of its {len(label_names)} classes"
    else:
        return
    raise ValueError(
        f"Label column '{column}' of split '{data_args.train_split}' {found}: a classifier trained on one class "
        "learns nothing (its loss is 0 from the start). Check --label_column and the dataset."
    )


def label_array(dataset: datasets.Dataset, column: str) -> pa.ChunkedArray:
    # One columnar read; touching neither the images nor Python objects per row.
    return dataset.with_format("arrow", columns=[column])[:][column]


def refuse_missing_labels(labels: pa.ChunkedArray, split: str, column: str) -> None:
    """Refuse null labels: a data file without the label column (`datasets` fills it with nulls), or left empty."""
    missing = labels.null_count
    if missing:
        raise ValueError(
            f"Split '{split}': {'all' if missing == len(labels) else f'{missing} of'} {len(labels)} labels in column "
            f"'{column}' are missing (null): {_MISSING_HINT}. Training and evaluation need every label."
        )


def check_label_range(dataset: datasets.Dataset, split: str, column: str, num_classes: int) -> None:
    labels = label_array(dataset, column)
    refuse_missing_labels(labels, split, column)
    valid = pc.fill_null(pc.and_(pc.greater_equal(labels, 0), pc.less(labels, num_classes)), False)
    invalid = pc.invert(valid)
    num_invalid = pc.sum(invalid).as_py() or 0
    if num_invalid:
        example = pc.filter(labels, invalid)[0].as_py()
        raise ValueError(
            f"Split '{split}': {num_invalid} of {len(labels)} labels in column '{column}' are outside "
            f"[0, {num_classes}), e.g. {example!r}.{_UNLABELED_HINT}"
        )


def check_streamed_labels(batch: dict, split: str, column: str, num_classes: int) -> dict:
    for label in batch[column]:
        if label is None:
            raise ValueError(f"Split '{split}': a label in column '{column}' is missing (null): {_MISSING_HINT}.")
        if not 0 <= label < num_classes:
            raise ValueError(
                f"Split '{split}': label {label!r} in column '{column}' is outside [0, {num_classes})."
                + _UNLABELED_HINT
            )
    return batch
