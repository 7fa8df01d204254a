"""`training.data.load_image_datasets` on every source it accepts: imagefolder, parquet, save_to_disk, streaming."""

import logging

import datasets
import numpy as np
import pytest

from training.args import DataArguments
from training.data import VALIDATION_SPLIT_SEED, load_image_datasets
from training.digits import DIGIT_NAMES, load_digits_dataset


@pytest.fixture(scope="module")
def digits():
    """Three training and two validation digits per class, 8 px: ImageNet's columns, small enough to write often."""
    full = load_digits_dataset(image_size=8)

    def per_class(split, count):
        labels = np.asarray(split["label"][:])
        return split.select([index for digit in range(10) for index in np.flatnonzero(labels == digit)[:count]])

    return datasets.DatasetDict({"train": per_class(full["train"], 3), "validation": per_class(full["validation"], 2)})


def write_imagefolder(split: datasets.Dataset, root):
    names = split.features["label"].names
    for index, example in enumerate(split):
        folder = root / names[example["label"]]
        folder.mkdir(parents=True, exist_ok=True)
        example["image"].save(folder / f"{index}.png")
    return root


def load(tmp_path, **kwargs):
    return load_image_datasets(DataArguments(cache_dir=str(tmp_path / "cache"), **kwargs))


def test_imagefolder_train_and_validation_dirs(digits, tmp_path):
    train_dir = write_imagefolder(digits["train"], tmp_path / "train")
    validation_dir = write_imagefolder(digits["validation"], tmp_path / "val")

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


def test_parquet_file_without_validation_split_is_carved_reproducibly(digits, tmp_path):
    path = tmp_path / "digits.parquet"
    digits["train"].to_parquet(str(path))

    first = load(tmp_path, dataset_name=str(path), validation_split_percentage=20)
    second = load(tmp_path, dataset_name=str(path), validation_split_percentage=20)

    assert first.label_names == DIGIT_NAMES
    assert {split: len(ds) for split, ds in first.dataset_dict.items()} == {"train": 24, "validation": 6}
    expected = digits["train"].train_test_split(test_size=0.2, seed=VALIDATION_SPLIT_SEED)["test"]["label"][:]
    assert first.dataset_dict["validation"]["label"][:] == second.dataset_dict["validation"]["label"][:] == expected
    assert first.dataset_dict["validation"][0]["image"]["bytes"].startswith(b"\x89PNG")


def test_parquet_directory_splits_come_from_file_names(digits, tmp_path):
    for split, dataset in digits.items():
        dataset.to_parquet(str(tmp_path / "data" / f"{split}-00000-of-00001.parquet"))

    data = load(tmp_path, dataset_name=str(tmp_path / "data"), max_train_samples=7, max_eval_samples=100)

    assert data.label_names == DIGIT_NAMES
    assert {split: len(ds) for split, ds in data.dataset_dict.items()} == {"train": 7, "validation": 20}


@pytest.mark.parametrize("whole_dict", [True, False], ids=["DatasetDict", "Dataset"])
def test_save_to_disk_directory(digits, tmp_path, whole_dict):
    (digits if whole_dict else digits["train"]).save_to_disk(str(tmp_path / "saved"))

    data = load(tmp_path, dataset_name=str(tmp_path / "saved"), validation_split_percentage=10)

    assert data.label_names == DIGIT_NAMES
    assert len(data.dataset_dict["validation"]) == (20 if whole_dict else 3)


def test_columns_detected_by_name_and_integer_labels_get_numbered_names(digits, tmp_path, caplog):
    encoded = digits["train"].cast_column("image", datasets.Image(decode=False))
    raw = datasets.Dataset.from_dict(
        {
            "id": list(range(len(encoded))),
            "img": [image["bytes"] for image in encoded["image"]],
            "cls": [label % 4 for label in encoded["label"]],
        }
    )
    raw.save_to_disk(str(tmp_path / "saved"))

    with caplog.at_level(logging.WARNING, logger="training.data"):
        data = load(tmp_path, dataset_name=str(tmp_path / "saved"))

    assert (data.image_column, data.label_column, data.label_names) == ("img", "cls", ["0", "1", "2", "3"])
    assert "Label column 'cls' has no ClassLabel feature: naming its 4 classes '0'..'3'" in caplog.text
    # Only the two columns the pipeline needs are kept, the bytes now as an undecoded Image.
    assert data.dataset_dict["train"].features == datasets.Features(
        {"img": datasets.Image(decode=False), "cls": datasets.Value("int64")}
    )


def test_columns_detected_by_feature_type(digits, tmp_path):
    renamed = digits.rename_columns({"image": "photo", "label": "category"})
    renamed.save_to_disk(str(tmp_path / "saved"))

    data = load(tmp_path, dataset_name=str(tmp_path / "saved"))

    assert (data.image_column, data.label_column, data.label_names) == ("photo", "category", DIGIT_NAMES)


def test_missing_or_ambiguous_columns_are_named(digits, tmp_path):
    unknown = digits.cast_column("image", datasets.Image(decode=False)).map(
        lambda example: {"photo": example["image"]["bytes"], "target": example["label"]},
        remove_columns=["image", "label"],
    )
    unknown.save_to_disk(str(tmp_path / "unknown"))
    with pytest.raises(ValueError, match=r"No image column found: .* the dataset has columns \['photo', 'target'\]"):
        load(tmp_path, dataset_name=str(tmp_path / "unknown"))
    with pytest.raises(ValueError, match=r"No column 'picture' \(--image_column\); .* \['photo', 'target'\]"):
        load(tmp_path, dataset_name=str(tmp_path / "unknown"), image_column="picture", label_column="target")

    two_images = digits.map(lambda example: {"mask": example["image"]}, features=datasets.Features(
        {"image": datasets.Image(), "label": digits["train"].features["label"], "mask": datasets.Image()}))
    two_images = two_images.rename_column("image", "scan")
    two_images.save_to_disk(str(tmp_path / "two_images"))
    with pytest.raises(ValueError, match=r"Several columns could hold the images: \['scan', 'mask'\]"):
        load(tmp_path, dataset_name=str(tmp_path / "two_images"))
    assert load(tmp_path, dataset_name=str(tmp_path / "two_images"), image_column="mask").image_column == "mask"


def test_unknown_split_is_named(digits, tmp_path):
    digits.save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(ValueError, match=r"Split 'training' not found; the dataset has splits \['train', 'valid"):
        load(tmp_path, dataset_name=str(tmp_path / "saved"), train_split="training")


def test_unlabeled_examples_fail_before_training(digits, tmp_path):
    # ImageNet's test split labels every example -1.
    unlabeled = digits["validation"].map(lambda example, index: {"label": -1 if index < 3 else example["label"]},
                                         with_indices=True)
    datasets.DatasetDict({"train": digits["train"], "validation": unlabeled}).save_to_disk(str(tmp_path / "saved"))

    with pytest.raises(ValueError, match=r"Split 'validation': 3 of 20 labels in column 'label' are outside "
                                         r"\[0, 10\), e.g. -1\. \(-1 marks unlabeled examples"):
        load(tmp_path, dataset_name=str(tmp_path / "saved"))


def test_integer_labels_beyond_the_train_classes_fail(digits, tmp_path):
    for split, dataset in digits.items():
        labels = [label % 4 if split == "train" else label for label in dataset["label"]]
        dataset.cast_column("label", datasets.Value("int64")).remove_columns("label").add_column(
            "label", labels
        ).to_parquet(str(tmp_path / "data" / f"{split}.parquet"))

    with pytest.raises(ValueError, match=r"Split 'validation': 12 of 20 labels in column 'label' are outside "
                                         r"\[0, 4\), e.g. 4\."):
        load(tmp_path, dataset_name=str(tmp_path / "data"))


def test_streaming_checks_labels_as_they_come(digits, tmp_path):
    unlabeled = digits["validation"].map(lambda example, index: {"label": -1 if index == 5 else example["label"]},
                                         with_indices=True)
    for split, dataset in (("train", digits["train"]), ("validation", unlabeled)):
        dataset.to_parquet(str(tmp_path / "data" / f"{split}-00000-of-00001.parquet"))

    data = load(tmp_path, dataset_name=str(tmp_path / "data"), streaming=True, max_train_samples=4)

    assert isinstance(data.dataset_dict, datasets.IterableDatasetDict) and data.label_names == DIGIT_NAMES
    train = list(data.dataset_dict["train"])
    assert len(train) == 4 and set(train[0]) == {"image", "label"} and train[0]["image"]["bytes"] is not None
    with pytest.raises(ValueError, match=r"Split 'validation': label -1 in column 'label' is outside \[0, 10\)"):
        list(data.dataset_dict["validation"])


def test_data_arguments_need_one_source():
    with pytest.raises(ValueError, match="Pass exactly one of `dataset_name` or `train_dir`"):
        DataArguments()
    with pytest.raises(ValueError, match="Pass exactly one of `dataset_name` or `train_dir`"):
        DataArguments(dataset_name="ILSVRC/imagenet-1k", train_dir="train")
    with pytest.raises(ValueError, match=r"`validation_split_percentage` must be in \(0, 100\)"):
        DataArguments(dataset_name="ILSVRC/imagenet-1k", validation_split_percentage=100)


def save_integer_labels(digits, tmp_path, labels_of_split) -> str:
    """The digits with their ClassLabel replaced by a plain int64 column, as a save_to_disk directory."""
    splits = {
        split: dataset.remove_columns("label").add_column("label", labels_of_split(split, dataset["label"][:]))
        for split, dataset in digits.items()
    }
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "saved"))
    return str(tmp_path / "saved")


@pytest.mark.parametrize("outlier", [10**5, 10**9])
def test_one_label_far_beyond_the_others_is_refused_not_a_huge_head(digits, tmp_path, outlier):
    def with_outlier(split, labels):
        return [outlier if index == 7 and split == "train" else label for index, label in enumerate(labels)]

    path = save_integer_labels(digits, tmp_path, with_outlier)
    with pytest.raises(ValueError, match=rf"Split 'train': label {outlier} in column 'label' would make {outlier + 1} "
                                         r"classes of which only 11 occur \(the next largest label is 9\)\. Pass "
                                         r"--num_labels"):
        load(tmp_path, dataset_name=path)


def test_num_labels_sets_the_class_count_of_integer_labels(digits, tmp_path, caplog):
    path = save_integer_labels(digits, tmp_path, lambda split, labels: [y % 4 for y in labels])
    with caplog.at_level(logging.WARNING, logger="training.data"):
        data = load(tmp_path, dataset_name=path, num_labels=12)
    assert data.label_names == [str(i) for i in range(12)]
    assert "naming its 12 classes '0'..'11' (--num_labels)" in caplog.text

    with pytest.raises(ValueError, match=r"Split 'train': 12 of 30 labels in column 'label' are outside \[0, 2\), "
                                         r"e\.g\. 2\."):
        load(tmp_path, dataset_name=path, num_labels=2)

    # Sparse labels (ids kept from a larger label set) train with --num_labels, and only with it.
    sparse = save_integer_labels(digits, tmp_path / "sparse", lambda split, labels: [100 * y for y in labels])
    with pytest.raises(ValueError, match="label 900 .* would make 901 classes of which only 10 occur"):
        load(tmp_path, dataset_name=sparse)
    assert len(load(tmp_path, dataset_name=sparse, num_labels=1000).label_names) == 1000


def test_num_labels_must_agree_with_a_class_label(digits, tmp_path):
    digits.save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(ValueError, match=r"--num_labels 11 contradicts label column 'label', whose ClassLabel names"):
        load(tmp_path, dataset_name=str(tmp_path / "saved"), num_labels=11)
    assert load(tmp_path, dataset_name=str(tmp_path / "saved"), num_labels=10).label_names == DIGIT_NAMES


def test_train_and_validation_class_labels_must_name_the_same_classes(digits, tmp_path):
    renamed = DIGIT_NAMES[:3] + ["three"] + DIGIT_NAMES[4:]
    validation = digits["validation"].cast_column("label", datasets.ClassLabel(names=renamed))
    datasets.DatasetDict({"train": digits["train"], "validation": validation}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(ValueError, match=r"Splits 'train' and 'validation' name their classes differently in column "
                                         r"'label' \(10 and 10 classes; class 3 is '3' and 'three'\)"):
        load(tmp_path, dataset_name=str(tmp_path / "saved"))


def test_streamed_integer_labels_need_num_labels(digits, tmp_path):
    for split, dataset in digits.items():
        dataset.cast_column("label", datasets.Value("int64")).to_parquet(str(tmp_path / "data" / f"{split}-0.parquet"))
    with pytest.raises(ValueError, match="number of classes of a streamed dataset is unknown; pass --num_labels"):
        load(tmp_path, dataset_name=str(tmp_path / "data"), streaming=True)
    data = load(tmp_path, dataset_name=str(tmp_path / "data"), streaming=True, num_labels=10)
    assert data.label_names == DIGIT_NAMES and len(list(data.dataset_dict["validation"])) == 20


@pytest.mark.parametrize("names, labels, found", [
    (["cat"], [0, 0, 0], r"names a single class \('cat'\)"),
    (["cat", "dog"], [1, 1, 1], "holds a single one of its 2 classes"),
])
def test_a_single_class_is_refused(digits, tmp_path, names, labels, found):
    train = digits["train"].select(range(3)).cast_column("label", datasets.Value("int64"))
    train = train.remove_columns("label").add_column("label", labels).cast_column("label", datasets.ClassLabel(
        names=names))
    train.to_parquet(str(tmp_path / "one.parquet"))
    with pytest.raises(ValueError, match=f"Label column 'label' of split 'train' {found}: a classifier trained on one"):
        load(tmp_path, dataset_name=str(tmp_path / "one.parquet"))


def test_data_files_whose_class_labels_differ_are_refused_before_datasets_casts_them(digits, tmp_path):
    # datasets gives every split the first file's features: the validation labels would mean other classes
    swapped = DIGIT_NAMES[:]
    swapped[3], swapped[7] = "7", "3"
    digits["train"].to_parquet(str(tmp_path / "data" / "train-00000-of-00001.parquet"))
    digits["validation"].cast_column("label", datasets.ClassLabel(names=swapped)).to_parquet(
        str(tmp_path / "data" / "validation-00000-of-00001.parquet"))
    with pytest.raises(ValueError, match=r"in column 'label' \(10 and 10 classes; class 3 is '3' and '7'\).* "
                                         r"train: \[0, 1, 2, 3, 4, 5, 6, 7, 8, 9\]; "
                                         r"validation: \[0, 1, 2, 7, 4, 5, 6, 3, 8, 9\]"):
        load(tmp_path, dataset_name=str(tmp_path / "data"))


def test_imagefolders_with_other_classes_are_refused_naming_both_lists(digits, tmp_path):
    train_dir = write_imagefolder(digits["train"].filter(lambda row: row["label"] != 4), tmp_path / "train")
    validation_dir = write_imagefolder(digits["validation"], tmp_path / "val")
    # a class of the validation directory only: the model would grow a class it never trains on
    with pytest.raises(ValueError, match=r"class directories of --train_dir and --validation_dir \(9 and 10 classes; "
                                         r"class 4 is '5' and '4'\).*train: \[0, 1, 2, 3, 5, 6, 7, 8, 9\]"):
        load(tmp_path, train_dir=str(train_dir), validation_dir=str(validation_dir))
    # a validation subset of the train classes names them alike (datasets numbers the union)
    subset = write_imagefolder(digits["validation"].filter(lambda row: row["label"] != 4), tmp_path / "subset")
    data = load(tmp_path, train_dir=str(validation_dir), validation_dir=str(subset))
    assert data.label_names == DIGIT_NAMES


def test_a_validation_split_without_the_label_column_names_it(digits, tmp_path):
    datasets.DatasetDict({"train": digits["train"], "validation": digits["validation"].remove_columns("label")}
                         ).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(ValueError,
                       match=r"Split 'validation' has no label column 'label' \(its columns: \['image'\]\)"):
        load(tmp_path, dataset_name=str(tmp_path / "saved"))
