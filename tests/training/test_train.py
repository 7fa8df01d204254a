"""`python -m training.train` end to end: dataset layouts, the saved checkpoint, resuming, and bad inputs."""

import json
import logging
import re
import shutil

import datasets
import pytest
import torch
from safetensors.torch import load_file
from transformers import get_scheduler, pipeline

from deit_hf import DeiTForImageClassificationWithTeacher
from training.build import apply_recipe_schedule, share_cpu_threads
from training.train import main, parse_args

from .conftest import tiny_run_args


def per_class(split, count):
    """The first `count` examples of each class: an imagefolder only knows the classes it has folders for."""
    labels = list(split["label"])
    return split.select([i for c in range(10) for i in [j for j, label in enumerate(labels) if label == c][:count]])


def write_imagefolder(split, root):
    for index, example in enumerate(split):
        folder = root / split.features["label"].int2str(example["label"])
        folder.mkdir(parents=True, exist_ok=True)
        example["image"].save(folder / f"{index}.png")


def test_recipe_defaults():
    arguments = parse_args(["--dataset_name", "x"])
    model_args, distill_args, aug_args = arguments.model, arguments.distillation, arguments.augmentation
    training_args = arguments.training
    assert (distill_args.teacher_model, distill_args.distillation_type, distill_args.distillation_alpha) == (
        "regnety_160.deit_in1k", "hard", 0.5)
    assert (distill_args.blr, distill_args.warmup_epochs, model_args.drop_path_rate) == (5e-4, 5, 0.1)
    assert (training_args.weight_decay, training_args.num_train_epochs, training_args.lr_scheduler_type.value) == (
        0.05, 300, "cosine_with_min_lr")
    assert training_args.max_grad_norm == 0  # no clipping (transformers' default clips at 1.0)
    assert not training_args.logging_nan_inf_filter  # no host synchronization in the training step
    assert training_args.ddp_find_unused_parameters is False  # every parameter gets a gradient: no DDP warning
    assert training_args.dataloader_persistent_workers
    assert (aug_args.auto_augment, aug_args.mixup, aug_args.cutmix, aug_args.smoothing, aug_args.reprob) == (
        "rand-m9-mstd0.5-inc1", 0.8, 1.0, 0.1, 0.25)
    assert aug_args.repeated_aug and aug_args.num_repeats == 3


def test_json_config_file(tmp_path):
    path = tmp_path / "args.json"
    path.write_text(json.dumps({"dataset_name": "x", "distillation_type": "soft", "distillation_tau": 3.0,
                                "output_dir": str(tmp_path), "mixup": 0.0}))
    arguments = parse_args([str(path)])
    distill_args, aug_args, training_args = arguments.distillation, arguments.augmentation, arguments.training
    assert (distill_args.distillation_type, distill_args.distillation_tau, aug_args.mixup) == ("soft", 3.0, 0.0)
    assert training_args.output_dir == str(tmp_path)


@pytest.mark.parametrize("layout", ["imagefolder", "parquet"])
def test_imagenet_style_inputs_train_and_save_a_pipeline_checkpoint(layout, digits, random_teacher_dir, tmp_path):
    train, validation = per_class(digits["train"], 3), per_class(digits["validation"], 2)
    if layout == "imagefolder":
        write_imagefolder(train, tmp_path / "train")
        write_imagefolder(validation, tmp_path / "val")
        source = ["--train_dir", str(tmp_path / "train"), "--validation_dir", str(tmp_path / "val")]
    else:
        (tmp_path / "data").mkdir()
        train.to_parquet(str(tmp_path / "data" / "train.parquet"))
        validation.to_parquet(str(tmp_path / "data" / "validation.parquet"))
        source = ["--dataset_name", str(tmp_path / "data")]
    args = tiny_run_args("unused", random_teacher_dir, tmp_path / "out", "--num_train_epochs", "1", "--do_eval", "true")
    args = source + args[2:]  # replace --dataset_name
    trainer = main(args)

    model = DeiTForImageClassificationWithTeacher.from_pretrained(tmp_path / "out")
    assert model.config.id2label == {i: str(i) for i in range(10)}  # label names from the dataset
    assert trainer.state.global_step == 4  # 30 images, batch 8
    classifier = pipeline("image-classification", model=str(tmp_path / "out"))
    assert classifier(validation[0]["image"], top_k=1)[0]["label"] in model.config.label2id
    metrics = json.loads((tmp_path / "out" / "eval_results.json").read_text())
    assert {"eval_top1", "eval_cls_top1", "eval_dist_top1", "eval_teacher_top1", "eval_token_cosine"} <= metrics.keys()


@pytest.mark.slow
def test_resume_continues_the_same_run(small_digits_dir, random_teacher_dir, tmp_path, caplog):
    """12 steps over 2 epochs (repeated augmentation, mixup), against a run stopped at step 8 and resumed."""
    common = ["--num_train_epochs", "2", "--save_strategy", "steps", "--save_steps", "4", "--logging_steps", "1",
              "--repeated_aug", "true", "--num_repeats", "3", "--mixup", "0.8", "--cutmix", "1.0"]
    uninterrupted = main(tiny_run_args(small_digits_dir, random_teacher_dir, tmp_path / "a", *common))
    assert uninterrupted.state.global_step == 12
    # The interrupted run: what the uninterrupted one had written when it was at step 8.
    shutil.copytree(tmp_path / "a" / "checkpoint-8", tmp_path / "b" / "checkpoint-8")

    with pytest.raises(ValueError, match="already holds checkpoints.*--resume_from_checkpoint last"):
        main(tiny_run_args(small_digits_dir, random_teacher_dir, tmp_path / "b", *common))
    with caplog.at_level(logging.INFO, logger="training"):
        resumed = main(tiny_run_args(small_digits_dir, random_teacher_dir, tmp_path / "b", *common,
                                     "--resume_from_checkpoint", "last"))
    assert resumed.state.global_step == 12
    assert f"Resuming from {tmp_path / 'b' / 'checkpoint-8'}." in caplog.text

    losses = lambda trainer: [e["loss"] for e in trainer.state.log_history if "loss" in e]  # noqa: E731
    assert losses(resumed)[-4:] == pytest.approx(losses(uninterrupted)[-4:], rel=1e-4)
    final_a, final_b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    for name, tensor in final_a.items():
        torch.testing.assert_close(final_b[name], tensor, atol=1e-5, rtol=1e-4, msg=name)


def test_labels_outside_the_classes_fail_before_training(digits, random_teacher_dir, tmp_path):
    # -1: how ImageNet's unlabeled test split marks its examples
    bad = digits["train"].select(range(8)).map(lambda e, i: {"label": -1 if i == 3 else e["label"]}, with_indices=True)
    datasets.DatasetDict({"train": bad, "validation": bad}).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(ValueError, match="-1"):
        main(tiny_run_args(tmp_path / "bad", random_teacher_dir, tmp_path / "out", "--max_steps", "1"))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_missing_columns_are_listed(small_digits_dir, random_teacher_dir, tmp_path):
    with pytest.raises(
        ValueError, match=r"No column 'photo' \(--image_column\); the dataset has columns \['image', 'label'\]"
    ):
        main(tiny_run_args(small_digits_dir, random_teacher_dir, tmp_path / "out", "--image_column", "photo"))


def test_teacher_with_other_classes_fails_before_training(small_digits_dir, tmp_path):
    from transformers import ResNetConfig, ResNetForImageClassification

    ResNetForImageClassification(
        ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1], num_labels=7)
    ).save_pretrained(tmp_path / "teacher7")
    with pytest.raises(ValueError, match="predicts 7 classes"):
        main(tiny_run_args(small_digits_dir, tmp_path / "teacher7", tmp_path / "out", "--max_steps", "1"))


def test_nonsense_student_config_is_refused(small_digits_dir, random_teacher_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(
            tiny_run_args(small_digits_dir, random_teacher_dir, tmp_path / "out", "--config_overrides", "patch_size=5")
        )
    assert "`image_size` height (32) must be a positive multiple of `patch_size` (5)" in capsys.readouterr().err


def _schedule(*flags, train_size=1000):
    """The learning rate and warm-up `main` would train with, from the given flags (batch 8 on one process)."""
    arguments = parse_args(
        ["--dataset_name", "x", "--per_device_train_batch_size", "8", "--num_train_epochs", "10", *flags])
    apply_recipe_schedule(arguments.training, arguments.distillation, train_size)
    return arguments.training


def _learning_rates(training_args, total_steps):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=training_args.learning_rate)
    scheduler = get_scheduler(
        training_args.lr_scheduler_type, optimizer, training_args.get_warmup_steps(total_steps), total_steps,
        scheduler_specific_kwargs=training_args.lr_scheduler_kwargs,
    )
    rates = []
    for _ in range(total_steps):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return rates


def test_recipe_rule_derives_the_schedule_by_default():
    training_args = _schedule()
    assert training_args.learning_rate == pytest.approx(5e-4 * 8 / 512)
    assert training_args.warmup_steps == 5 * 125  # 5 epochs of 1000 / 8 steps


@pytest.mark.parametrize("flags, learning_rate, warmup_steps", [
    (["--learning_rate", "1e-3", "--warmup_steps", "0"], 1e-3, 0),
    (["--learning_rate=1e-3"], 1e-3, 625),
    (["--warmup_steps", "7"], 5e-4 * 8 / 512, 7),
    (["--blr", "1e-3"], 1e-3 * 8 / 512, 625),
])
def test_an_explicit_learning_rate_or_warmup_wins_over_the_recipe_rule(flags, learning_rate, warmup_steps):
    training_args = _schedule(*flags)
    assert (training_args.learning_rate, training_args.warmup_steps) == (pytest.approx(learning_rate), warmup_steps)
    rates = _learning_rates(training_args, 1250)
    assert max(rates) == pytest.approx(learning_rate)  # what the optimizer actually gets


def test_an_explicit_learning_rate_in_a_json_file_wins_too(tmp_path):
    path = tmp_path / "args.json"
    path.write_text(json.dumps({"dataset_name": "x", "learning_rate": 2e-3, "per_device_train_batch_size": 8}))
    arguments = parse_args([str(path)])
    apply_recipe_schedule(arguments.training, arguments.distillation, 1000)
    assert arguments.training.learning_rate == 2e-3


@pytest.mark.parametrize("pair", [("--blr", "--learning_rate"), ("--warmup_epochs", "--warmup_steps")])
def test_both_flags_of_a_pair_are_refused_naming_both(pair, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--dataset_name", "x", pair[0], "1", pair[1], "1"])
    error = capsys.readouterr().err
    assert pair[0] in error and pair[1] in error


def test_a_learning_rate_below_the_cosine_floor_never_rises(caplog):
    training_args = _schedule("--learning_rate", "2e-6", "--warmup_steps", "10")
    assert "not above the cosine's min_lr" in caplog.text
    rates = _learning_rates(training_args, 100)
    assert max(rates) == pytest.approx(2e-6)
    after_warmup = rates[10:]
    assert all(later <= earlier for earlier, later in zip(after_warmup, after_warmup[1:], strict=False))


def test_warmup_longer_than_the_run_warns(caplog):
    _schedule("--warmup_epochs", "20")
    assert "Warm-up (2500 steps) is as long as the whole run (1250 steps)" in caplog.text


def test_the_schedule_used_is_shown_at_the_default_log_level(small_digits_dir, random_teacher_dir, tmp_path, caplog):
    main(tiny_run_args(small_digits_dir, random_teacher_dir, tmp_path / "out", "--max_steps", "2",
                       "--learning_rate", "1e-3", "--warmup_steps", "0"))
    assert "Global batch 8: learning rate 0.001, 0 warm-up steps, 2 steps in all." in caplog.text
    assert logging.getLogger("training.build").isEnabledFor(logging.INFO)


def test_a_teacher_near_chance_stops_the_run_before_step_1(small_digits_dir, random_teacher_dir, tmp_path):
    with pytest.raises(ValueError, match=r"top-1 on 32 validation images is .* near chance"):
        main(tiny_run_args(small_digits_dir, random_teacher_dir, tmp_path / "out", "--teacher_check_batches", "1"))
    assert not list((tmp_path / "out").glob("checkpoint-*")) and not (tmp_path / "out" / "model.safetensors").exists()


def test_a_teacher_with_other_class_names_is_refused(small_digits_dir, tmp_path):
    from transformers import ResNetConfig, ResNetForImageClassification

    names = [str(9 - digit) for digit in range(10)]  # the right classes in reverse order
    ResNetForImageClassification(ResNetConfig(
        embedding_size=8, hidden_sizes=[8], depths=[1], num_labels=10, id2label=dict(enumerate(names)),
        label2id={name: i for i, name in enumerate(names)},
    )).save_pretrained(tmp_path / "teacher")
    with pytest.raises(ValueError, match=r"\(10 of 10 differ\): class 0: teacher '9', dataset '0'"):
        main(tiny_run_args(small_digits_dir, tmp_path / "teacher", tmp_path / "out", "--max_steps", "1"))


@pytest.mark.parametrize("local_size_variable", ["LOCAL_WORLD_SIZE", "MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE"])
@pytest.mark.parametrize(
    "cores, local_processes, workers, expected", [(2, 1, 1, 1), (16, 1, 8, 8), (16, 8, 8, 1), (8, 2, 0, 4)]
)
def test_cpu_threads_are_shared_with_the_workers_and_other_processes(monkeypatch, cores, local_processes, workers,
                                                                     expected, local_size_variable):
    """Local processes counted as torchrun (`accelerate launch --multi_gpu`), MPICH or Open MPI (`MULTI_CPU`) tell."""
    for variable in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE", "MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv(local_size_variable, str(local_processes))
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cores)))
    before = torch.get_num_threads()
    try:
        assert share_cpu_threads(workers) == expected == torch.get_num_threads()
        monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's (or accelerate launch's) choice wins
        torch.set_num_threads(3)
        assert share_cpu_threads(workers) == 3
    finally:
        torch.set_num_threads(before)


def test_yaml_config_file_with_flags_that_override_it(tmp_path):
    path = tmp_path / "args.yaml"
    path.write_text("dataset_name: x\nmixup: 0.0\ndistillation_type: soft\nscale: [0.5, 1.0]\n")
    arguments = parse_args([str(path), "--mixup", "0.5", "--blr", "1e-3"])
    distill_args, data_args, aug_args = arguments.distillation, arguments.data, arguments.augmentation
    assert (data_args.dataset_name, distill_args.distillation_type, aug_args.scale) == ("x", "soft", [0.5, 1.0])
    assert (aug_args.mixup, distill_args.blr) == (0.5, 1e-3)  # the flags win over the file


def test_json_config_file_with_an_extra_flag(tmp_path):
    path = tmp_path / "args.json"
    path.write_text(json.dumps({"dataset_name": "x", "learning_rate": 1e-3}))
    arguments = parse_args([str(path), "--num_train_epochs", "3"])
    distill_args, training_args = arguments.distillation, arguments.training
    assert (training_args.num_train_epochs, training_args.learning_rate, distill_args.blr) == (3, 1e-3, 0)


@pytest.mark.parametrize("argv_in_file, flags, message", [
    ({"dataset_name": "x", "mixpu": 0.5}, [], "unknown arguments in .*args.json: mixpu"),
    ({"dataset_name": "x"}, ["--train_dir", "y"], "Pass exactly one of `dataset_name` or `train_dir`"),
    ({"dataset_name": "x"}, ["--label_smoothing_factor", "0.1"], "use --smoothing"),
])
def test_argument_errors_are_one_line_usage_errors(tmp_path, capsys, argv_in_file, flags, message):
    path = tmp_path / "args.json"
    path.write_text(json.dumps(argv_in_file))
    with pytest.raises(SystemExit) as exit_info:
        parse_args([str(path), *flags])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert re.search(message, error) and "Traceback" not in error


def _fine_tune_args(dataset_dir, checkpoint, output_dir, *extra):
    """`tiny_run_args` starting from a checkpoint: no preset or overrides, no teacher."""
    args = tiny_run_args(dataset_dir, None, output_dir, "--model_name_or_path", str(checkpoint),
                         "--distillation_type", "none", "--max_steps", "1", *extra)
    for flag in ("--model_preset", "--config_overrides", "--input_size"):
        index = args.index(flag)
        del args[index:index + 2]
    return args


@pytest.fixture
def deit_checkpoint(tmp_path):
    """A 32 px, 3-class deit_hf checkpoint."""
    from deit_hf import DeiTConfig

    config = DeiTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, num_labels=3, id2label={0: "cat", 1: "dog", 2: "fox"},
                        label2id={"cat": 0, "dog": 1, "fox": 2})
    DeiTForImageClassificationWithTeacher(config).save_pretrained(tmp_path / "ckpt")
    return tmp_path / "ckpt"


def test_fine_tuning_takes_size_and_architecture_from_the_checkpoint_and_swaps_heads(
        small_digits_dir, deit_checkpoint, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="training.train")
    trainer = main(_fine_tune_args(small_digits_dir, deit_checkpoint, tmp_path / "out"))
    config = trainer.model.config
    assert (config.image_size, config.hidden_size, config.num_labels) == (32, 32, 10)
    assert "New heads: 3 classes (cat, dog, fox) -> 10 classes from the dataset (0, 1, 2, ...)." in caplog.text
    kept = DeiTForImageClassificationWithTeacher.from_pretrained(deit_checkpoint).state_dict()
    trained = load_file(tmp_path / "out" / "model.safetensors")
    assert trained["deit.embeddings.cls_token"].shape == kept["deit.embeddings.cls_token"].shape


@pytest.mark.parametrize("extra, message", [
    (["--input_size", "60"], r"--input_size 60 is not a multiple of the checkpoint's patch size 8 \(.* takes 32x32"),
    (["--distillation_token", "false"], r"--distillation_token false but .*ckpt has a distillation token "
     r"\(deit\.embeddings\.distillation_token, distillation_classifier\.weight and \.bias\)"),
    (["--config_overrides", "hidden_dropout_prob=0.1"], "checkpoint keeps its own configuration"),
    (["--model_preset", "deit-small-distilled-patch16-224"], "--model_preset and --model_name_or_path"),
])
def test_fine_tuning_refuses_flags_that_contradict_the_checkpoint(small_digits_dir, deit_checkpoint, tmp_path, capsys,
                                                                  extra, message):
    with pytest.raises(SystemExit):
        parse_args(_fine_tune_args(small_digits_dir, deit_checkpoint, tmp_path / "out", *extra))
    assert re.search(message, capsys.readouterr().err)


def test_fine_tuning_refuses_a_checkpoint_whose_weights_do_not_load(small_digits_dir, tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=4, intermediate_size=64, num_labels=10)).save_pretrained(
        tmp_path / "vit")
    with pytest.raises(ValueError, match=r"model_type 'vit'\) is not a DeiT checkpoint .*: weights \d+ missing"):
        main(_fine_tune_args(small_digits_dir, tmp_path / "vit", tmp_path / "out"))



def test_evaluation_only_needs_no_teacher_unless_one_is_named(small_digits_dir, random_teacher_dir, tmp_path,
                                                              monkeypatch):
    import training.build

    main(tiny_run_args(small_digits_dir, random_teacher_dir, tmp_path / "run", "--max_steps", "1"))
    def without(args, *flags):  # the flags and their values
        kept, dropping = [], False
        for token in args:
            dropping = token in flags if token.startswith("--") else dropping
            kept += [] if dropping else [token]
        return kept

    evaluate = without(tiny_run_args(small_digits_dir, random_teacher_dir, tmp_path / "eval", "--do_train", "false",
                                     "--do_eval", "true", "--model_name_or_path", str(tmp_path / "run")),
                       "--model_preset", "--config_overrides")
    without_teacher = without(evaluate, "--teacher_model", "--teacher_check_batches")
    # the paper's default teacher (regnety_160, fetched from the Hub) stays the default of training runs only
    assert parse_args(["--dataset_name", "x"]).distillation.teacher_model == "regnety_160.deit_in1k"
    load_teacher = training.build.load_teacher
    monkeypatch.setattr(training.build, "load_teacher", lambda *args, **kwargs: pytest.fail("a teacher was loaded"))
    metrics = main(without_teacher).evaluate()
    assert "eval_top1" in metrics and not any("teacher" in name for name in metrics)
    monkeypatch.setattr(training.build, "load_teacher", load_teacher)
    assert "eval_teacher_top1" in main(evaluate).evaluate()


@pytest.mark.parametrize("interval, strategy", [("save_steps", "save_strategy"), ("eval_steps", "eval_strategy")])
def test_an_interval_given_alone_switches_its_strategy_to_steps(interval, strategy):
    training_args = parse_args(["--dataset_name", "x", f"--{interval}", "7"]).training
    assert getattr(training_args, strategy) == "steps" and getattr(training_args, interval) == 7
    training_args = parse_args(["--dataset_name", "x", f"--{interval}", "7", f"--{strategy}", "epoch"]).training
    assert getattr(training_args, strategy) == "epoch"  # the strategy given wins
    assert parse_args(["--dataset_name", "x"]).training.save_strategy == "epoch"  # the recipe's


def test_resume_from_checkpoint_help_mentions_last(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "RESUME_FROM_CHECKPOINT `last`: continue from the newest complete, undamaged checkpoint" in help_text
