"""`training.data.load_image_datasets` on every source it accepts: imagefolder, parquet, save_to_disk, streaming."""

import logging

import datasets
import pytest

from training.args import DataArguments
from training.argument_checks import check_data_source
from training.data import VALIDATION_SPLIT_SEED, load_image_datasets
from training.digits import DIGIT_NAMES


def write_imagefolder(split: datasets.Dataset, root):
    names = split.features["label"].names
    for index, example in enumerate(split):
        folder = root / names[example["label"]]
        folder.mkdir(parents=True, exist_ok=True)
        example["image"].save(folder / f"{index}.png")
    return root


def load(tmp_path, **kwargs):
    return load_image_datasets(DataArguments(cache_dir=str(tmp_path / "cache"), **kwargs))


def test_imagefolder_train_and_validation_dirs(few_digits, tmp_path):
    train_dir = write_imagefolder(few_digits["train"], tmp_path / "train")
    validation_dir = write_imagefolder(few_digits["validation"], tmp_path / "val")

    data = load(tmp_path, train_dir=str(train_dir), validation_dir=str(validation_dir))

    assert (data.image_column, data.label_column, data.label_names) == ("image", "label", DIGIT_NAMES)
    assert data.id2label[3] == "3" and data.label2id["9"] == 9
    assert {split: len(ds) for split, ds in data.dataset_dict.items()} == {"train": 30, "validation": 20}
    train = data.dataset_dict["train"]
    # Undecoded, so that the DataLoader workers, not the main process, decode the images.
    assert train.features["image"] == datasets.Image(decode=False)
    example = train[0]
    assert example["image"]["path"].endswith(".png") and example["image"]["bytes"] is None
    assert example["image"]["path"].split("/")[-2] == DIGIT_NAMES[example["label"]]


def test_parquet_file_without_validation_split_is_carved_reproducibly(few_digits, tmp_path):
    path = tmp_path / "digits.parquet"
    few_digits["train"].to_parquet(str(path))

    first = load(tmp_path, dataset_name=str(path), validation_split_percentage=20)
    second = load(tmp_path, dataset_name=str(path), validation_split_percentage=20)

    assert first.label_names == DIGIT_NAMES
    assert {split: len(ds) for split, ds in first.dataset_dict.items()} == {"train": 24, "validation": 6}
    expected = few_digits["train"].train_test_split(test_size=0.2, seed=VALIDATION_SPLIT_SEED)["test"]["label"][:]
    assert first.dataset_dict["validation"]["label"][:] == second.dataset_dict["validation"]["label"][:] == expected
    assert first.dataset_dict["validation"][0]["image"]["bytes"].startswith(b"\x89PNG")


def test_parquet_directory_splits_come_from_file_names(few_digits, tmp_path):
    for split, dataset in few_digits.items():
        dataset.to_parquet(str(tmp_path / "data" / f"{split}-00000-of-00001.parquet"))

    data = load(tmp_path, dataset_name=str(tmp_path / "data"), max_train_samples=7, max_eval_samples=100)

    assert data.label_names == DIGIT_NAMES
    assert {split: len(ds) for split, ds in data.dataset_dict.items()} == {"train": 7, "validation": 20}


@pytest.mark.parametrize("whole_dict", [True, False], ids=["DatasetDict", "Dataset"])
def test_save_to_disk_directory(few_digits, tmp_path, whole_dict):
    (few_digits if whole_dict else few_digits["train"]).save_to_disk(str(tmp_path / "saved"))

    data = load(tmp_path, dataset_name=str(tmp_path / "saved"), validation_split_percentage=10)

    assert data.label_names == DIGIT_NAMES
    assert len(data.dataset_dict["validation"]) == (20 if whole_dict else 3)


def test_columns_detected_by_name_and_integer_labels_get_numbered_names(few_digits, tmp_path, caplog):
    encoded = few_digits["train"].cast_column("image", datasets.Image(decode=False))
    raw = datasets.Dataset.from_dict(
        {
            "id": list(range(len(encoded))),
            "img": [image["bytes"] for image in encoded["image"]],
            "cls": [label % 4 for label in encoded["label"]],
        }
    )
    raw.save_to_disk(str(tmp_path / "saved"))

    with caplog.at_level(logging.WARNING, logger="training.labels"):
        data = load(tmp_path, dataset_name=str(tmp_path / "saved"))

    assert (data.image_column, data.label_column, data.label_names) == ("img", "cls", ["0", "1", "2", "3"])
    assert "Label column 'cls' has no ClassLabel feature: naming its 4 classes '0'..'3'" in caplog.text
    # Only the two columns the pipeline needs are kept, the bytes now as an undecoded Image.
    assert data.dataset_dict["train"].features == datasets.Features(
        {"img": datasets.Image(decode=False), "cls": datasets.Value("int64")}
    )


def test_columns_detected_by_feature_type(few_digits, tmp_path):
    renamed = few_digits.rename_columns({"image": "photo", "label": "category"})
    renamed.save_to_disk(str(tmp_path / "saved"))

    data = load(tmp_path, dataset_name=str(tmp_path / "saved"))

    assert (data.image_column, data.label_column, data.label_names) == ("photo", "category", DIGIT_NAMES)


def test_missing_or_ambiguous_columns_are_named(few_digits, tmp_path):
    unknown = few_digits.cast_column("image", datasets.Image(decode=False)).map(
        lambda example: {"photo": example["image"]["bytes"], "target": example["label"]},
        remove_columns=["image", "label"],
    )
    unknown.save_to_disk(str(tmp_path / "unknown"))
    with pytest.raises(ValueError, match=r"No image column found: .* the dataset has columns \['photo', 'target'\]"):
        load(tmp_path, dataset_name=str(tmp_path / "unknown"))
    with pytest.raises(ValueError, match=r"No column 'picture' \(--image_column\); .* \['photo', 'target'\]"):
        load(tmp_path, dataset_name=str(tmp_path / "unknown"), image_column="picture", label_column="target")

    two_images = few_digits.map(lambda example: {"mask": example["image"]}, features=datasets.Features(
        {"image": datasets.Image(), "label": few_digits["train"].features["label"], "mask": datasets.Image()}))
    two_images = two_images.rename_column("image", "scan")
    two_images.save_to_disk(str(tmp_path / "two_images"))
    with pytest.raises(ValueError, match=r"Several columns could hold the images: \['scan', 'mask'\]"):
        load(tmp_path, dataset_name=str(tmp_path / "two_images"))
    assert load(tmp_path, dataset_name=str(tmp_path / "two_images"), image_column="mask").image_column == "mask"


def test_unknown_split_is_named(few_digits, tmp_path):
    few_digits.save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(ValueError, match=r"Split 'training' not found; the dataset has splits \['train', 'valid"):
        load(tmp_path, dataset_name=str(tmp_path / "saved"), train_split="training")


def test_data_arguments_need_one_source():
    with pytest.raises(ValueError, match="Pass exactly one of `dataset_name` or `train_dir`"):
        check_data_source(DataArguments())
    with pytest.raises(ValueError, match="Pass exactly one of `dataset_name` or `train_dir`"):
        check_data_source(DataArguments(dataset_name="ILSVRC/imagenet-1k", train_dir="train"))
    with pytest.raises(ValueError, match=r"`validation_split_percentage` must be in \(0, 100\)"):
        DataArguments(dataset_name="ILSVRC/imagenet-1k", validation_split_percentage=100)
