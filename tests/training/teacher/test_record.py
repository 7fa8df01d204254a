"""`--teacher_cache`: the teacher's targets recorded once, replayed exactly without the teacher; refusals, integrity."""

import json
import logging
import math
import shutil

import pytest
import torch
from datasets import DatasetDict
from safetensors import safe_open

from deit_hf.losses import DistillationLoss
from training import build, record_teacher
from training.teacher.fingerprint import record_fingerprint
from training.teacher.store import TeacherRecord, TeacherRecordError, decode, encode, part_name
from training.train import main, parse_args
from training.transforms import BatchTransform

from ..conftest import tiny_run_args
from ..test_distributed import PROBE, launch, two_processes
from ..test_distributed import losses as logged_losses
from ..test_skipped_images import with_garbage

# 48 digits in batches of 8: 6 steps per epoch
TWO_EPOCHS = ["--num_train_epochs", "2", "--logging_steps", "1", "--save_strategy", "no", "--eval_strategy", "epoch"]


# The whole recipe's randomness on (after the tests' still augmentation): crops, flips, RandAugment, erasing,
# Mixup/CutMix, drop path and repeated augmentation, each drawn from (seed, epoch, position / step, process).
FULL_RECIPE = [
    "--auto_augment", "rand-m9-mstd0.5-inc1", "--hflip", "0.5", "--scale", "0.08", "1", "--reprob", "0.25",
    "--mixup", "0.8", "--cutmix", "1.0", "--drop_path_rate", "0.1", "--repeated_aug", "true",
]


ONE_EPOCH = ["--num_train_epochs", "1", "--logging_steps", "1", "--save_strategy", "no", "--eval_strategy", "epoch"]


def losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def evaluations(trainer) -> list[dict]:
    return [{name: value for name, value in entry.items() if "runtime" not in name and "per_second" not in name}
            for entry in trainer.state.log_history if "eval_loss" in entry]


def test_with_the_whole_recipe_a_replayed_run_equals_the_recording_run(small_digits_dir, random_teacher_dir,
                                                                        tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    recording = main(tiny_run_args(small_digits_dir, random_teacher_dir, tmp_path / "a", *TWO_EPOCHS, *FULL_RECIPE,
                                   "--teacher_cache", cache))
    monkeypatch.setattr(build, "load_teacher", lambda *a, **k: pytest.fail("the teacher was loaded"))
    replaying = main(tiny_run_args(small_digits_dir, random_teacher_dir, tmp_path / "b", *TWO_EPOCHS, *FULL_RECIPE,
                                   "--teacher_cache", cache))
    assert replaying.teacher is None and len(losses(replaying)) == 12
    assert losses(replaying) == losses(recording)
    assert evaluations(replaying) == evaluations(recording)


@pytest.mark.slow
def test_a_replayed_run_equals_the_recording_run_without_loading_the_teacher(
    small_digits_dir, random_teacher_dir, tmp_path, caplog, monkeypatch
):
    cache = str(tmp_path / "cache")
    caplog.set_level(logging.INFO, logger="training.teacher.targets")
    online = main(tiny_run_args(small_digits_dir, random_teacher_dir, tmp_path / "online", *TWO_EPOCHS))
    recording = main(tiny_run_args(small_digits_dir, random_teacher_dir, tmp_path / "a", *TWO_EPOCHS,
                                   "--teacher_cache", cache))
    assert f"recording teacher targets to {cache}" in caplog.messages
    assert sorted(p.name for p in (tmp_path / "cache").glob("*.safetensors")) == [
        "epoch-00000.process-0.safetensors", "epoch-00001.process-0.safetensors", "eval-1x32.process-0.safetensors"]

    monkeypatch.setattr(build, "load_teacher", lambda *a, **k: pytest.fail("the teacher was loaded"))
    caplog.clear()
    replaying = main(tiny_run_args(small_digits_dir, random_teacher_dir, tmp_path / "b", *TWO_EPOCHS,
                                   "--teacher_cache", cache))
    assert f"replaying teacher targets from {cache}; teacher not loaded" in caplog.messages
    assert replaying.teacher is None
    assert len(losses(replaying)) == 12
    # hard distillation: the recorded class is the teacher's argmax, so all three runs compute the same losses
    assert losses(replaying) == losses(recording) == losses(online)
    assert evaluations(replaying) == evaluations(recording) == evaluations(online)
    assert "eval_teacher_top1" in evaluations(replaying)[-1]


@pytest.mark.slow
def test_a_longer_run_extends_the_record_and_a_resumed_run_records_the_rest(
    small_digits_dir, random_teacher_dir, tmp_path, caplog
):
    """Mixup and repeated augmentation on, checkpoints every 4 steps: the full recording run (A), a record of its
    first 8 steps only (B), resumed at A's checkpoint 8 (C: it records steps 8-11), then replayed (D)."""
    common = ["--num_train_epochs", "2", "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "4",
              "--eval_strategy", "no", "--repeated_aug", "true", "--mixup", "0.8", "--cutmix", "1.0"]
    full = main(tiny_run_args(small_digits_dir, random_teacher_dir, tmp_path / "a", *common,
                              "--teacher_cache", str(tmp_path / "cache_a")))
    main(tiny_run_args(small_digits_dir, random_teacher_dir, tmp_path / "b", *common, "--max_steps", "8",
                       "--teacher_cache", str(tmp_path / "cache")))
    assert _recorded_groups(tmp_path / "cache", 1) == "0-1"  # one mix group per step on 1 process x 8
    shutil.copytree(tmp_path / "a" / "checkpoint-8", tmp_path / "c" / "checkpoint-8")
    caplog.set_level(logging.INFO, logger="training.teacher.targets")
    resumed = main(tiny_run_args(small_digits_dir, random_teacher_dir, tmp_path / "c", *common,
                                 "--teacher_cache", str(tmp_path / "cache"), "--resume_from_checkpoint", "last"))
    assert any(message.startswith("recording teacher targets") for message in caplog.messages)
    assert losses(resumed)[-4:] == pytest.approx(losses(full)[-4:], rel=1e-6)
    assert _recorded_groups(tmp_path / "cache", 1) == "0-5"

    replayed = main(tiny_run_args(small_digits_dir, random_teacher_dir, tmp_path / "d", *common,
                                  "--teacher_cache", str(tmp_path / "cache")))
    assert replayed.teacher is None
    assert losses(replayed) == losses(full)


def test_resuming_mid_epoch_under_replay(small_digits_dir, random_teacher_dir, tmp_path, monkeypatch):
    common = ["--num_train_epochs", "2", "--logging_steps", "1", "--save_strategy", "steps", "--save_steps", "4",
              "--save_total_limit", "3", "--eval_strategy", "no", "--teacher_cache", str(tmp_path / "cache")]
    recording = main(tiny_run_args(small_digits_dir, random_teacher_dir, tmp_path / "a", *common))
    shutil.copytree(tmp_path / "a" / "checkpoint-4", tmp_path / "b" / "checkpoint-4")  # mid-epoch 0 (6 steps)
    monkeypatch.setattr(build, "load_teacher", lambda *a, **k: pytest.fail("the teacher was loaded"))
    resumed = main(tiny_run_args(small_digits_dir, random_teacher_dir, tmp_path / "b", *common,
                                 "--resume_from_checkpoint", "last"))
    assert resumed.state.global_step == 12 and resumed.teacher is None
    assert losses(resumed)[-8:] == pytest.approx(losses(recording)[-8:], rel=1e-6)


def _recorded_groups(cache, epoch: int) -> str:
    with safe_open(str(cache / part_name(epoch, 0)), "pt") as file:
        return file.metadata()["keys"]


# Each item of the fingerprint, changed by a flag: (flags, the item the refusal names).
CHANGES = [
    (["--seed", "1"], "seed"),
    (["--mixup", "0.5"], "mixup"),
    (["--auto_augment", "rand-m9-mstd0.5-inc1"], "auto_augment"),
    (["--reprob", "0.25"], "reprob"),
    (["--input_size", "40"], "input_size"),
    (["--repeated_aug", "false"], "repeated_aug"),
    (["--per_device_train_batch_size", "16", "--mix_group_size", "8"], "global_batch"),
    (["--gradient_accumulation_steps", "2", "--mix_group_size", "8"], "global_batch"),
    (["--mix_group_size", "4"], "mix_group_size"),
    (["--max_train_samples", "40"], "dataset"),
    (["--teacher_mean", "0.5", "0.5", "0.5", "--teacher_std", "0.5", "0.5", "0.5"], "teacher normalisation"),
    (["--distillation_type", "soft"], "distillation_type"),
    (["--bf16", "true"], "precision"),
]


@pytest.mark.parametrize("flags, item", CHANGES, ids=[item for _, item in CHANGES])
def test_a_record_of_another_run_is_refused_naming_what_differs(flags, item, small_digits_dir, random_teacher_dir,
                                                                 tmp_path):
    base = tiny_run_args(small_digits_dir, random_teacher_dir, tmp_path / "out", "--teacher_cache",
                         str(tmp_path / "cache"))
    record = TeacherRecord(tmp_path / "cache", _fingerprint(base))
    (tmp_path / "cache").mkdir()
    record.write_fingerprint({})
    changed = TeacherRecord(tmp_path / "cache", _fingerprint([*base, *flags]))
    refusal = rf"holds the teacher's targets of another run \(([^)]*; )?{item}: recorded"
    with pytest.raises(TeacherRecordError, match=refusal) as error:
        changed.check_fingerprint()
    # one line; soft distillation also brings its top k and temperature
    assert "\n" not in str(error.value)
    assert str(error.value).count(": recorded") == 1 + 2 * (item == "distillation_type")


def _fingerprint(argv, datasets=None, **training_changes):
    arguments = parse_args(argv)
    distill_args, data_args, aug_args = arguments.distillation, arguments.data, arguments.augmentation
    training_args = arguments.training
    for name, value in training_changes.items():
        setattr(training_args, name, value)
    splits = datasets or {"train": _Split(str(data_args.max_train_samples)), "validation": _Split("v")}
    return record_fingerprint(splits, distill_args, aug_args, training_args, (0.5,) * 3, (0.5,) * 3)


class _Split:
    def __init__(self, fingerprint):
        self._fingerprint = fingerprint


def test_other_processes_teacher_weights_and_top_k_are_refused(random_teacher_dir, tmp_path, monkeypatch):
    base = ["--dataset_name", "x", "--teacher_model", str(random_teacher_dir), "--distillation_type", "soft",
            "--teacher_cache", str(tmp_path / "cache")]
    (tmp_path / "cache").mkdir()
    TeacherRecord(tmp_path / "cache", _fingerprint(base)).write_fingerprint({})
    other_teacher = tmp_path / "teacher"
    shutil.copytree(random_teacher_dir, other_teacher)
    weights = other_teacher / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")  # the same model name, other weights
    cases = [([*base, "--teacher_model", str(other_teacher)], "teacher"), ([*base, "--teacher_cache_top_k", "3"],
             "teacher_cache_top_k"), ([*base, "--distillation_tau", "3"], "distillation_tau")]
    for argv, item in cases:
        with pytest.raises(TeacherRecordError, match=rf"\({item}: recorded"):
            TeacherRecord(tmp_path / "cache", _fingerprint(argv)).check_fingerprint()
    # more processes at the same per-device batch: another global batch (the same one on another layout replays)
    monkeypatch.setattr(type(parse_args(base).training), "world_size", property(lambda self: 2))
    with pytest.raises(TeacherRecordError, match=r"\(global_batch: recorded 128, now 256\)"):
        TeacherRecord(tmp_path / "cache", _fingerprint(base)).check_fingerprint()


def test_a_refused_record_stops_the_run_before_training(small_digits_dir, random_teacher_dir, tmp_path):
    args = tiny_run_args(small_digits_dir, random_teacher_dir, tmp_path / "a", "--max_steps", "1",
                         "--eval_strategy", "no", "--teacher_cache", str(tmp_path / "cache"))
    main(args)
    with pytest.raises(TeacherRecordError, match=r"another run \(seed: recorded 42, now 7\)"):
        main([*args, "--seed", "7", "--output_dir", str(tmp_path / "b")])
    assert not (tmp_path / "b").exists()


def test_unread_cache_flags_are_refused(small_digits_dir, tmp_path, capsys):
    for flags, message in [
        (["--teacher_cache_top_k", "5"], "--teacher_cache_top_k is read with --teacher_cache only"),
        (["--teacher_cache", "c", "--teacher_cache_top_k", "5"], "--teacher_cache_top_k is for soft distillation"),
        (["--teacher_cache", "c", "--streaming", "true"], "cannot record a --streaming one"),
        (["--teacher_cache", "c", "--distillation_type", "none"], "there is no teacher to record"),
    ]:
        with pytest.raises(SystemExit):
            parse_args(["--dataset_name", str(small_digits_dir), *flags])
        assert message in capsys.readouterr().err


def test_a_layout_that_splits_a_mix_group_is_refused_in_one_line(small_digits_dir, capsys):
    for flags, message in [
        (["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2", "--mix_group_size", "8"],
         "--per_device_train_batch_size 4 would split mix groups of 8 (--mix_group_size): make it a multiple of 8"),
        (["--streaming", "true", "--mix_group_size", "4"], "--mix_group_size is read for a dataset of known length"),
    ]:
        with pytest.raises(SystemExit):
            parse_args(["--dataset_name", str(small_digits_dir), *flags])
        error = capsys.readouterr().err
        assert message in error.strip().splitlines()[-1], error  # the refusal, whole, on its one line


def _saved_part(tmp_path, entries=None) -> TeacherRecord:
    record = TeacherRecord(tmp_path, {"seed": 0})
    entries = entries or {0: (torch.tensor([1.0, 2.0]), encode(torch.randn(8, 10), "hard", 0)),
                          1: (torch.tensor([3.0, 4.0]), encode(torch.randn(5, 10), "hard", 0))}
    record.save(part_name(0, 0), entries)
    return record


def test_a_part_round_trips(tmp_path):
    logits = torch.randn(8, 10)
    entries = {3: (torch.tensor([1.0, 2.0]), encode(logits, "hard", 0))}
    loaded = _saved_part(tmp_path, entries).load(part_name(0, 0))
    assert list(loaded) == [3]
    assert torch.equal(decode(loaded[3][1], 10, torch.device("cpu")).argmax(1), logits.argmax(1))


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_a_damaged_record_is_an_error_naming_the_file(damage, tmp_path):
    record = _saved_part(tmp_path)
    path = tmp_path / part_name(0, 0)
    data = bytearray(path.read_bytes())
    if damage == "truncated":
        del data[-7:]
    else:
        data[-3] ^= 0xFF  # a class index
    path.write_bytes(bytes(data))
    with pytest.raises(TeacherRecordError, match=rf"Teacher record {path} is (truncated or )?corrupt"):
        record.load(part_name(0, 0))


def test_a_truncated_record_stops_a_replaying_run(small_digits_dir, random_teacher_dir, tmp_path):
    args = tiny_run_args(small_digits_dir, random_teacher_dir, tmp_path / "a", "--num_train_epochs", "1",
                         "--eval_strategy", "no", "--save_strategy", "no", "--teacher_cache", str(tmp_path / "cache"))
    main(args)
    path = tmp_path / "cache" / part_name(0, 0)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(TeacherRecordError, match=rf"Teacher record {path} is truncated or corrupt"):
        main([*args, "--output_dir", str(tmp_path / "b")])


def test_views_that_differ_from_the_recorded_ones_are_refused(small_digits_dir, random_teacher_dir, tmp_path,
                                                               monkeypatch):
    """An input pipeline that does not reproduce the recording run's (here: it flips every training image) is caught
    by the batches' digests, not given the targets of other views."""
    args = tiny_run_args(small_digits_dir, random_teacher_dir, tmp_path / "a", "--num_train_epochs", "1",
                         "--eval_strategy", "no", "--save_strategy", "no", "--teacher_cache", str(tmp_path / "cache"))
    main(args)
    transform = BatchTransform.__call__

    def flipping(self, pixel_values, labels, training, group_seeds=()):
        pixel_values, labels = transform(self, pixel_values, labels, training, group_seeds)
        return pixel_values.flip(-1) if training else pixel_values, labels

    monkeypatch.setattr(BatchTransform, "__call__", flipping)
    with pytest.raises(TeacherRecordError, match=r"The views of mix group 0 of epoch 0 differ"):
        main([*args, "--output_dir", str(tmp_path / "b"), "--logging_steps", "1"])


@pytest.mark.slow
def test_mix_groups_that_undecodable_images_shrink_or_empty_replay_on_another_layout(digits, random_teacher_dir,
                                                                                      tmp_path, caplog):
    """42 of 48 images do not decode: groups of 4 shrink, some to nothing, some micro-batches hold no image at all.
    Recorded on 1 x 8, replayed on 1 x 4 with accumulation 2: every group, empty ones too, is found, its views alike."""
    DatasetDict({"train": with_garbage(digits["train"].select(range(48)), set(range(48)) - {3, 10, 11, 20, 33, 41}),
                 "validation": digits["validation"].select(range(32))}).save_to_disk(str(tmp_path / "data"))
    common = ["--num_train_epochs", "1", "--logging_steps", "1", "--save_strategy", "no", "--eval_strategy", "no",
              "--do_eval", "false", "--min_decodable_fraction", "0", "--mix_group_size", "4", "--reprob", "0.25",
              "--mixup", "0.8", "--cutmix", "1.0", "--teacher_cache", str(tmp_path / "cache")]
    main(tiny_run_args(tmp_path / "data", random_teacher_dir, tmp_path / "a", *common))
    caplog.set_level(logging.INFO, logger="training.teacher.targets")
    replaying = main(without_teacher_flags(tiny_run_args(
        tmp_path / "data", random_teacher_dir, tmp_path / "b", *common, "--per_device_train_batch_size", "4",
        "--gradient_accumulation_steps", "2")))
    assert replaying.teacher is None and any("teacher not loaded" in message for message in caplog.messages)
    assert replaying.state.global_step == 6 and losses(replaying)
    fingerprint = json.loads((tmp_path / "cache" / "fingerprint.json").read_text())["items"]
    groups = TeacherRecord(tmp_path / "cache", fingerprint).load(part_name(0, 0))
    sizes = [len(stored["classes"]) for _, (_, stored) in sorted(groups.items())]
    assert len(sizes) == 12 and 0 < sum(sizes) < 48  # 48 views in groups of 4, recorded though shrunk
    assert any(sizes[group] == sizes[group + 1] == 0 for group in range(0, 12, 2))  # a micro-batch of 8 held none


@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_soft_top_k_replay_keeps_the_teachers_leftover_mass_on_the_other_classes(tau):
    torch.manual_seed(0)
    teacher_logits = torch.randn(64, 100) * 4  # peaked: most of the mass in a few classes
    student_logits, cls_logits, labels = torch.randn(64, 100), torch.randn(64, 100), torch.randint(0, 100, (64,))
    loss = DistillationLoss("soft", alpha=1.0, tau=tau)

    def distillation_loss(targets):
        return float(loss(cls_logits, labels, student_logits, targets).distillation_loss)

    def replayed(k):
        return decode(encode(teacher_logits, "soft", k, tau), 100, torch.device("cpu"))

    online = distillation_loss(teacher_logits)
    assert distillation_loss(replayed(100)) == pytest.approx(online, rel=1e-3)  # every logit kept: fp16 rounding only
    p = (teacher_logits.double() / tau).softmax(1)
    for k in (5, 20):
        top = p.topk(k, dim=1)
        in_top = torch.zeros_like(p, dtype=torch.bool).scatter_(1, top.indices, True)
        # at the loss's temperature, the top k's probabilities are the teacher's; the others share its leftover mass
        expected = torch.where(in_top, p, (1 - top.values.sum(1, keepdim=True)) / (100 - k))
        torch.testing.assert_close((replayed(k).double() / tau).softmax(1), expected, atol=2e-3, rtol=0)
        # nearer the online loss than the top k alone, renormalised (the other classes at probability 0)
        top_alone = teacher_logits.masked_fill(~in_top, -1e4)
        assert abs(distillation_loss(replayed(k)) - online) < abs(distillation_loss(top_alone) - online), k


def test_hard_targets_keep_non_finite_teacher_outputs():
    logits = torch.randn(4, 10)
    logits[2, 3] = math.nan
    replayed = decode(encode(logits, "hard", 0), 10, torch.device("cpu"))
    assert replayed[2].isnan().all() and replayed[[0, 1, 3]].isfinite().all()
    assert torch.equal(replayed[[0, 1, 3]].argmax(1), logits[[0, 1, 3]].argmax(1))


def test_a_pass_without_student_records_what_the_students_replay(small_digits_dir, random_teacher_dir, tmp_path,
                                                                 caplog):
    """With the whole recipe on: the pass draws each micro-batch's erasing and Mixup/CutMix as the trainer does."""
    cache = str(tmp_path / "cache")
    recording = main(tiny_run_args(small_digits_dir, random_teacher_dir, tmp_path / "a", *ONE_EPOCH, *FULL_RECIPE,
                                   "--teacher_cache", str(tmp_path / "online_cache")))
    record_teacher.main(tiny_run_args(small_digits_dir, random_teacher_dir, tmp_path / "r", *ONE_EPOCH, *FULL_RECIPE,
                                      "--teacher_cache", cache))
    caplog.set_level(logging.INFO, logger="training.teacher.targets")
    replaying = main(tiny_run_args(small_digits_dir, random_teacher_dir, tmp_path / "b", *ONE_EPOCH, *FULL_RECIPE,
                                   "--teacher_cache", cache, "--teacher_cache_check", "2"))
    assert any("teacher loaded to check (epoch, mix group)" in message for message in caplog.messages)
    assert sum("match the record's" in message for message in caplog.messages) >= 2
    assert losses(replaying) == losses(recording)
    assert evaluations(replaying) == evaluations(recording)


def test_the_cache_check_finds_targets_the_teacher_does_not_give(small_digits_dir, random_teacher_dir, tmp_path):
    args = tiny_run_args(small_digits_dir, random_teacher_dir, tmp_path / "a", "--num_train_epochs", "1",
                         "--eval_strategy", "no", "--save_strategy", "no", "--teacher_cache", str(tmp_path / "cache"))
    main(args)
    fingerprint = json.loads((tmp_path / "cache" / "fingerprint.json").read_text())["items"]
    record = TeacherRecord(tmp_path / "cache", fingerprint)
    entries = record.load(part_name(0, 0))
    entries = {key: (digest, {"classes": (stored["classes"] + 1) % 10}) for key, (digest, stored) in entries.items()}
    record.save(part_name(0, 0), entries)
    with pytest.raises(TeacherRecordError, match=r"--teacher_cache_check: the teacher's targets for mix group \d+"):
        main([*args, "--output_dir", str(tmp_path / "b"), "--teacher_cache_check", "6"])


@pytest.mark.slow
def test_a_record_made_on_two_processes_replays_on_any_layout_of_its_global_batch(small_digits_dir,
                                                                                  random_teacher_dir, tmp_path, caplog):
    """Recorded on 2 processes x 8 with the whole recipe (drop path 0: the student's own draws are per micro-batch),
    then replayed with no teacher flag on 2 x 8, on 1 x 16 and on 1 x 8 with accumulation 2 (mix groups of 8 each
    time): the same global batch, views, mix groups and targets, so the recording run's losses, step for step."""
    cache = str(tmp_path / "cache")
    common = ["--num_train_epochs", "1", "--logging_steps", "1", "--save_strategy", "no", *FULL_RECIPE,
              "--drop_path_rate", "0", "--mix_group_size", "8", "--teacher_cache", cache]
    evaluating = ["--eval_strategy", "epoch"]
    logs = {}
    for name in ("a", "b"):  # each waited for up to 300 s: two processes start, train 3 steps and evaluate
        args = tiny_run_args(small_digits_dir, random_teacher_dir, tmp_path / name, *common, *evaluating)
        result = launch(two_processes(), PROBE, args if name == "a" else without_teacher_flags(args),
                        SAVE_PROBE_FILE=str(tmp_path / f"{name}.saves"))
        assert result.returncode == 0, result.stderr[-3000:]
        logs[name] = result.stderr
    assert f"recording teacher targets to {cache}" in logs["a"]
    assert f"replaying teacher targets from {cache}; teacher not loaded" in logs["b"]
    parts = sorted(p.name for p in (tmp_path / "cache").glob("*.safetensors"))
    assert parts == ["epoch-00000.process-0.safetensors", "epoch-00000.process-1.safetensors",
                     "eval-2x32.process-0.safetensors", "eval-2x32.process-1.safetensors"]
    recorded = logged_losses(tmp_path / "a")
    assert len(recorded) == 3 and logged_losses(tmp_path / "b") == recorded  # 48 images / 16
    evaluation = [entry for entry in json.loads((tmp_path / "b" / "trainer_state.json").read_text())["log_history"]
                  if "eval_loss" in entry]
    assert "eval_teacher_top1" in evaluation[-1]

    not_evaluating = ["--eval_strategy", "no", "--do_eval", "false"]
    caplog.set_level(logging.INFO, logger="training.teacher.targets")
    for name, layout in [("c", ["--per_device_train_batch_size", "16"]), ("d", ["--gradient_accumulation_steps", "2"])]:
        args = tiny_run_args(small_digits_dir, random_teacher_dir, tmp_path / name, *common, *not_evaluating, *layout)
        replaying = main(without_teacher_flags(args))
        assert replaying.teacher is None and f"replaying teacher targets from {cache}; teacher not loaded" in (
            caplog.messages), name
        caplog.clear()
        assert losses(replaying) == pytest.approx(recorded, rel=1e-5), name


def without_teacher_flags(args: list[str]) -> list[str]:
    """`args` without the flags that name the teacher: a replay adopts the record's."""
    at = args.index("--teacher_model")
    return args[:at] + args[at + 2:]
