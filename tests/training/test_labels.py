"""`training.labels`, through `training.data.load_image_datasets`: class names, class counts and label checks."""

import logging

import datasets
import pytest

from training.digits import DIGIT_NAMES

from .test_data import load, write_imagefolder


def test_unlabeled_examples_fail_before_training(few_digits, tmp_path):
    # ImageNet's test split labels every example -1.
    unlabeled = few_digits["validation"].map(lambda example, index: {"label": -1 if index < 3 else example["label"]},
                                         with_indices=True)
    datasets.DatasetDict({"train": few_digits["train"], "validation": unlabeled}).save_to_disk(str(tmp_path / "saved"))

    with pytest.raises(ValueError, match=r"Split 'validation': 3 of 20 labels in column 'label' are outside "
                                         r"\[0, 10\), e.g. -1\. \(-1 marks unlabeled examples"):
        load(tmp_path, dataset_name=str(tmp_path / "saved"))


def test_integer_labels_beyond_the_train_classes_fail(few_digits, tmp_path):
    for split, dataset in few_digits.items():
        labels = [label % 4 if split == "train" else label for label in dataset["label"]]
        dataset.cast_column("label", datasets.Value("int64")).remove_columns("label").add_column(
            "label", labels
        ).to_parquet(str(tmp_path / "data" / f"{split}.parquet"))

    with pytest.raises(ValueError, match=r"Split 'validation': 12 of 20 labels in column 'label' are outside "
                                         r"\[0, 4\), e.g. 4\."):
        load(tmp_path, dataset_name=str(tmp_path / "data"))


def test_streaming_checks_labels_as_they_come(few_digits, tmp_path):
    unlabeled = few_digits["validation"].map(lambda example, index: {"label": -1 if index == 5 else example["label"]},
                                         with_indices=True)
    for split, dataset in (("train", few_digits["train"]), ("validation", unlabeled)):
        dataset.to_parquet(str(tmp_path / "data" / f"{split}-00000-of-00001.parquet"))

    data = load(tmp_path, dataset_name=str(tmp_path / "data"), streaming=True, max_train_samples=4)

    assert isinstance(data.dataset_dict, datasets.IterableDatasetDict) and data.label_names == DIGIT_NAMES
    train = list(data.dataset_dict["train"])
    assert len(train) == 4 and set(train[0]) == {"image", "label"} and train[0]["image"]["bytes"] is not None
    with pytest.raises(ValueError, match=r"Split 'validation': label -1 in column 'label' is outside \[0, 10\)"):
        list(data.dataset_dict["validation"])


def save_integer_labels(digits, tmp_path, labels_of_split) -> str:
    """The digits with their ClassLabel replaced by a plain int64 column, as a save_to_disk directory."""
    splits = {
        split: dataset.remove_columns("label").add_column("label", labels_of_split(split, dataset["label"][:]))
        for split, dataset in digits.items()
    }
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "saved"))
    return str(tmp_path / "saved")


@pytest.mark.parametrize("outlier", [10**5, 10**9])
def test_one_label_far_beyond_the_others_is_refused_not_a_huge_head(few_digits, tmp_path, outlier):
    def with_outlier(split, labels):
        return [outlier if index == 7 and split == "train" else label for index, label in enumerate(labels)]

    path = save_integer_labels(few_digits, tmp_path, with_outlier)
    with pytest.raises(ValueError, match=rf"Split 'train': label {outlier} in column 'label' would make {outlier + 1} "
                                         r"classes of which only 11 occur \(the next largest label is 9\)\. Pass "
                                         r"--num_labels"):
        load(tmp_path, dataset_name=path)


def test_num_labels_sets_the_class_count_of_integer_labels(few_digits, tmp_path, caplog):
    path = save_integer_labels(few_digits, tmp_path, lambda split, labels: [y % 4 for y in labels])
    with caplog.at_level(logging.WARNING, logger="training.labels"):
        data = load(tmp_path, dataset_name=path, num_labels=12)
    assert data.label_names == [str(i) for i in range(12)]
    assert "naming its 12 classes '0'..'11' (--num_labels)" in caplog.text

    with pytest.raises(ValueError, match=r"Split 'train': 12 of 30 labels in column 'label' are outside \[0, 2\), "
                                         r"e\.g\. 2\."):
        load(tmp_path, dataset_name=path, num_labels=2)

    # Sparse labels (ids kept from a larger label set) train with --num_labels, and only with it.
    sparse = save_integer_labels(few_digits, tmp_path / "sparse", lambda split, labels: [100 * y for y in labels])
    with pytest.raises(ValueError, match="label 900 .* would make 901 classes of which only 10 occur"):
        load(tmp_path, dataset_name=sparse)
    assert len(load(tmp_path, dataset_name=sparse, num_labels=1000).label_names) == 1000


def test_num_labels_must_agree_with_a_class_label(few_digits, tmp_path):
    few_digits.save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(ValueError, match=r"--num_labels 11 contradicts label column 'label', whose ClassLabel names"):
        load(tmp_path, dataset_name=str(tmp_path / "saved"), num_labels=11)
    assert load(tmp_path, dataset_name=str(tmp_path / "saved"), num_labels=10).label_names == DIGIT_NAMES


def test_train_and_validation_class_labels_must_name_the_same_classes(few_digits, tmp_path):
    renamed = DIGIT_NAMES[:3] + ["three"] + DIGIT_NAMES[4:]
    validation = few_digits["validation"].cast_column("label", datasets.ClassLabel(names=renamed))
    datasets.DatasetDict({"train": few_digits["train"], "validation": validation}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(ValueError, match=r"Splits 'train' and 'validation' name their classes differently in column "
                                         r"'label' \(10 and 10 classes; class 3 is '3' and 'three'\)"):
        load(tmp_path, dataset_name=str(tmp_path / "saved"))


def test_streamed_integer_labels_need_num_labels(few_digits, tmp_path):
    for split, dataset in few_digits.items():
        dataset.cast_column("label", datasets.Value("int64")).to_parquet(str(tmp_path / "data" / f"{split}-0.parquet"))
    with pytest.raises(ValueError, match="number of classes of a streamed dataset is unknown; pass --num_labels"):
        load(tmp_path, dataset_name=str(tmp_path / "data"), streaming=True)
    data = load(tmp_path, dataset_name=str(tmp_path / "data"), streaming=True, num_labels=10)
    assert data.label_names == DIGIT_NAMES and len(list(data.dataset_dict["validation"])) == 20


@pytest.mark.parametrize("names, labels, found", [
    (["cat"], [0, 0, 0], r"names a single class \('cat'\)"),
    (["cat", "dog"], [1, 1, 1], "holds a single one of its 2 classes"),
])
def test_a_single_class_is_refused(few_digits, tmp_path, names, labels, found):
    train = few_digits["train"].select(range(3)).cast_column("label", datasets.Value("int64"))
    train = train.remove_columns("label").add_column("label", labels).cast_column("label", datasets.ClassLabel(
        names=names))
    train.to_parquet(str(tmp_path / "one.parquet"))
    with pytest.raises(ValueError, match=f"Label column 'label' of split 'train' {found}: a classifier trained on one"):
        load(tmp_path, dataset_name=str(tmp_path / "one.parquet"))


def test_data_files_whose_class_labels_differ_are_refused_before_datasets_casts_them(few_digits, tmp_path):
    # datasets gives every split the first file's features: the validation labels would mean other classes
    swapped = DIGIT_NAMES[:]
    swapped[3], swapped[7] = "7", "3"
    few_digits["train"].to_parquet(str(tmp_path / "data" / "train-00000-of-00001.parquet"))
    few_digits["validation"].cast_column("label", datasets.ClassLabel(names=swapped)).to_parquet(
        str(tmp_path / "data" / "validation-00000-of-00001.parquet"))
    with pytest.raises(ValueError, match=r"in column 'label' \(10 and 10 classes; class 3 is '3' and '7'\).* "
                                         r"train: \[0, 1, 2, 3, 4, 5, 6, 7, 8, 9\]; "
                                         r"validation: \[0, 1, 2, 7, 4, 5, 6, 3, 8, 9\]"):
        load(tmp_path, dataset_name=str(tmp_path / "data"))


def test_imagefolders_with_other_classes_are_refused_naming_both_lists(few_digits, tmp_path):
    train_dir = write_imagefolder(few_digits["train"].filter(lambda row: row["label"] != 4), tmp_path / "train")
    validation_dir = write_imagefolder(few_digits["validation"], tmp_path / "val")
    # a class of the validation directory only: the model would grow a class it never trains on
    with pytest.raises(ValueError, match=r"class directories of --train_dir and --validation_dir \(9 and 10 classes; "
                                         r"class 4 is '5' and '4'\).*train: \[0, 1, 2, 3, 5, 6, 7, 8, 9\]"):
        load(tmp_path, train_dir=str(train_dir), validation_dir=str(validation_dir))
    # a validation subset of the train classes names them alike (datasets numbers the union)
    subset = write_imagefolder(few_digits["validation"].filter(lambda row: row["label"] != 4), tmp_path / "subset")
    data = load(tmp_path, train_dir=str(validation_dir), validation_dir=str(subset))
    assert data.label_names == DIGIT_NAMES


def test_a_validation_split_without_the_label_column_names_it(few_digits, tmp_path):
    datasets.DatasetDict({"train": few_digits["train"], "validation": few_digits["validation"].remove_columns("label")}
                         ).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(ValueError,
                       match=r"Split 'validation' has no label column 'label' \(its columns: \['image'\]\)"):
        load(tmp_path, dataset_name=str(tmp_path / "saved"))


@pytest.mark.parametrize("streaming", [False, True])
def test_a_validation_file_without_the_label_column_names_it_not_none_outside_the_classes(few_digits, tmp_path,
                                                                                         streaming):
    # datasets fills the column a data file lacks with nulls
    few_digits["train"].to_parquet(str(tmp_path / "data" / "train-00000-of-00001.parquet"))
    few_digits["validation"].remove_columns("label").to_parquet(
        str(tmp_path / "data" / "validation-00000-of-00001.parquet"))
    if not streaming:
        with pytest.raises(ValueError, match=r"^Split 'validation': all 20 labels in column 'label' are missing "
                                             r"\(null\): a data file of the split lacks the column"):
            load(tmp_path, dataset_name=str(tmp_path / "data"))
        return
    data = load(tmp_path, dataset_name=str(tmp_path / "data"), streaming=True)
    with pytest.raises(ValueError, match=r"Split 'validation': a label in column 'label' is missing \(null\)"):
        list(data.dataset_dict["validation"])


def test_null_train_labels_are_named_before_the_class_count_reads_them(few_digits, tmp_path):
    train = few_digits["train"].cast_column("label", datasets.Value("int64"))
    labels = [None if index < 3 else label for index, label in enumerate(train["label"])]
    datasets.DatasetDict({"train": train.remove_columns("label").add_column("label", labels),
                          "validation": few_digits["validation"]}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(ValueError, match=r"^Split 'train': 3 of 30 labels in column 'label' are missing \(null\)"):
        load(tmp_path, dataset_name=str(tmp_path / "saved"))
