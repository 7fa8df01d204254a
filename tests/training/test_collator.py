"""`DistillationCollator`, alone and at the end of the pipeline: dataset -> ImageTransform -> DataLoader."""

import logging

import datasets
import pytest
import torch
from torch.utils.data import DataLoader

from training.args import AugmentationArguments, DataArguments
from training.collator import IGNORE_INDEX, DistillationCollator
from training.data import attach_transform, load_image_datasets
from training.digits import load_digits_dataset
from training.transforms import ImageTransform, build_eval_transform, build_train_transform

GARBAGE = b"\xff\xd8 not really a jpeg"


def sample(label, size=4):
    return {"pixel_values": torch.full((3, size, size), float(label)), "labels": label}


def test_stacks_float_pixels_and_int64_labels_dropping_undecoded_samples():
    corrupt = {"pixel_values": None, "labels": None}

    batch = DistillationCollator()([sample(1), corrupt, sample(2), corrupt, sample(5)])

    assert batch["pixel_values"].dtype == torch.float32 and batch["pixel_values"].shape == (3, 3, 4, 4)
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [1.0, 2.0, 5.0]
    assert batch["labels"].dtype == torch.int64 and batch["labels"].tolist() == [1, 2, 5]
    assert batch["skipped_images"].tolist() == [2]


def test_uint8_pixels_stay_uint8_for_the_device_to_normalize():
    pixels = torch.arange(48, dtype=torch.uint8).view(3, 4, 4)

    batch = DistillationCollator()([{"pixel_values": pixels, "labels": 0}, {"pixel_values": pixels + 1, "labels": 1}])

    assert batch["pixel_values"].dtype == torch.uint8
    assert torch.equal(batch["pixel_values"], torch.stack([pixels, pixels + 1]))
    assert batch["skipped_images"].tolist() == [0]


def test_all_corrupt_batch_is_empty():
    batch = DistillationCollator()([{"pixel_values": None, "labels": None}] * 3)

    assert batch["labels"].numel() == 0 and batch["labels"].dtype == torch.int64
    assert batch["pixel_values"].numel() == 0
    assert batch["skipped_images"].tolist() == [3]


def test_with_a_blank_shape_undecoded_samples_keep_their_rows_labelled_ignore_index():
    corrupt = {"pixel_values": None, "labels": None}
    collate = DistillationCollator(blank_shape=(3, 4, 4))  # as in evaluation

    batch = collate([sample(1), corrupt, sample(2), corrupt])

    assert batch.keys() == {"pixel_values", "labels"} and batch["pixel_values"].dtype == torch.float32
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [1.0, 0.0, 2.0, 0.0]
    assert batch["labels"].tolist() == [1, IGNORE_INDEX, 2, IGNORE_INDEX]
    nothing = collate([corrupt] * 3)
    assert nothing["pixel_values"].shape == (3, 3, 4, 4) and nothing["labels"].tolist() == [IGNORE_INDEX] * 3


@pytest.fixture(scope="module")
def digits():
    return load_digits_dataset(image_size=16)["train"].select(range(6))


def write_imagefolder(split, root, garbage_name=None):
    for index, example in enumerate(split):
        folder = root / str(example["label"])
        folder.mkdir(parents=True, exist_ok=True)
        example["image"].save(folder / f"{index}.png")
    if garbage_name:
        (root / str(split[0]["label"]) / garbage_name).write_bytes(GARBAGE)
    return str(root)


def write_parquet(split, path, garbage_name=None):
    rows = split.cast_column("image", datasets.Image(decode=False)).to_list()
    if garbage_name:
        rows.insert(2, {"image": {"bytes": GARBAGE, "path": garbage_name}, "label": 0})
    datasets.Dataset.from_list(rows, features=split.features).to_parquet(str(path))


@pytest.mark.parametrize("layout", ["imagefolder", "parquet", "parquet-streaming"])
def test_corrupt_image_is_skipped_and_dropped_from_its_batch(digits, tmp_path, caplog, layout):
    if layout == "imagefolder":
        data_args = DataArguments(
            train_dir=write_imagefolder(digits, tmp_path / "train", garbage_name="corrupt.jpg"),
            validation_dir=write_imagefolder(digits.select([0]), tmp_path / "val"),
        )
    else:
        write_parquet(digits, tmp_path / "data" / "train-00000-of-00001.parquet", garbage_name="corrupt.jpg")
        write_parquet(digits.select([0]), tmp_path / "data" / "validation-00000-of-00001.parquet")
        data_args = DataArguments(dataset_name=str(tmp_path / "data"), streaming=layout.endswith("streaming"))
    data_args.cache_dir = str(tmp_path / "cache")
    data = load_image_datasets(data_args)
    transform = ImageTransform(
        build_train_transform(AugmentationArguments(input_size=16)), data.image_column, data.label_column
    )
    train = attach_transform(data.dataset_dict["train"], transform)
    loader = DataLoader(train, batch_size=16, collate_fn=DistillationCollator())

    with caplog.at_level(logging.WARNING, logger="training.transforms"):
        (batch,) = list(loader)

    # Seven images, one of them garbage.
    assert batch["pixel_values"].shape == (6, 3, 16, 16)
    # By name: imagefolder numbers only the classes it finds, in directory order.
    assert sorted(data.label_names[label] for label in batch["labels"]) == sorted(map(str, digits["label"][:]))
    (message,) = caplog.messages
    assert "corrupt.jpg" in message
    assert batch["skipped_images"].tolist() == [1]


def test_pipeline_on_the_validation_split(digits, tmp_path):
    digits.save_to_disk(str(tmp_path / "saved"))
    data = load_image_datasets(DataArguments(dataset_name=str(tmp_path / "saved"), validation_split_percentage=50))
    validation = data.dataset_dict["validation"]
    eval_transform = build_eval_transform(AugmentationArguments(input_size=16))
    loader = DataLoader(
        attach_transform(validation, ImageTransform(eval_transform)), batch_size=2, collate_fn=DistillationCollator()
    )

    batches = list(loader)

    labels = torch.cat([batch["labels"] for batch in batches])
    assert labels.tolist() == validation["label"][:]
    first_image = datasets.Image(mode="RGB").decode_example(validation[0]["image"])
    torch.testing.assert_close(batches[0]["pixel_values"][0], eval_transform(first_image))
