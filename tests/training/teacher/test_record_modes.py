"""`--teacher_cache`: the teacher a record names, the modes a run is in (record, replay, check) and nothing else, and
the digest that ties each batch's targets to its views in order."""

import json
import logging
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import TrainerCallback

from training import build
from training.teacher import identity as teacher_identity
from training.teacher.store import TeacherRecordError, digest, digests_match, part_name
from training.train import main
from training.transforms import BatchTransform

from ..conftest import tiny_run_args
from ..test_distributed import REPO, probe_env
from .test_record import TWO_EPOCHS, losses, without_teacher_flags

ONE_EPOCH_NO_EVAL = ["--num_train_epochs", "1", "--eval_strategy", "no", "--save_strategy", "no"]


def test_the_record_names_its_teacher_by_its_weights_not_its_folder(small_digits_dir, random_teacher_dir, tmp_path,
                                                                    caplog, monkeypatch):
    """Recorded with a teacher folder; replayed with the same weights in another folder, then with no teacher flag
    (the record's teacher adopted, nothing read); `--teacher_cache_check` then needs the teacher and says where it
    is missing."""
    teacher = tmp_path / "teacher"
    shutil.copytree(random_teacher_dir, teacher)
    cache = str(tmp_path / "cache")
    caplog.set_level(logging.INFO, logger="training")
    args = tiny_run_args(small_digits_dir, teacher, tmp_path / "a", *ONE_EPOCH_NO_EVAL, "--logging_steps", "1",
                         "--teacher_cache", cache)
    recording = main(args)
    identity = json.loads((tmp_path / "cache" / "fingerprint.json").read_text())["items"]["teacher"]
    assert identity.startswith("local classifier, files ") and "teacher" not in identity
    assert f"Teacher {teacher} ({identity})." in caplog.messages  # name and weights hash, both logged

    renamed = tmp_path / "renamed"
    teacher.rename(renamed)
    monkeypatch.setattr(build, "load_teacher", lambda *a, **k: pytest.fail("the teacher was loaded"))
    caplog.clear()
    copied = main(tiny_run_args(small_digits_dir, renamed, tmp_path / "b", *ONE_EPOCH_NO_EVAL, "--logging_steps",
                                "1", "--teacher_cache", cache))
    assert copied.teacher is None and losses(copied) == losses(recording)
    assert f"Teacher {renamed} ({identity})." in caplog.messages

    monkeypatch.setattr(teacher_identity, "_file_hash", lambda *a: pytest.fail("the teacher's weights were read"))
    caplog.clear()
    adopted = main([*without_teacher_flags(args), "--output_dir", str(tmp_path / "c")])
    assert adopted.teacher is None and losses(adopted) == losses(recording)
    assert f"Teacher {teacher} ({identity}): the record's, as no teacher flag names one." in caplog.messages

    with pytest.raises(TeacherRecordError) as error:
        main([*without_teacher_flags(args), "--output_dir", str(tmp_path / "d"), "--teacher_cache_check", "1"])
    assert str(error.value) == (
        f"--teacher_cache_check 1 needs the record's teacher, {teacher}, but {teacher} is not there: name the teacher "
        "with --teacher_model (and --teacher_checkpoint).")


class RemovePart(TrainerCallback):
    """Removes a part of the record at the end of the first epoch, while the run replays it."""

    def __init__(self, path):
        self.path = path

    def on_epoch_end(self, args, state, control, **kwargs):
        if state.epoch == 1:
            self.path.unlink()


@pytest.mark.parametrize("check", ["0", "2"], ids=["replay", "check"])
def test_a_part_removed_during_the_run_is_an_error_naming_it(check, small_digits_dir, random_teacher_dir, tmp_path):
    """Neither blamed on the record's length nor recorded again by the teacher loaded to check it."""
    args = tiny_run_args(small_digits_dir, random_teacher_dir, tmp_path / "a", *TWO_EPOCHS, "--eval_strategy", "no",
                         "--teacher_cache", str(tmp_path / "cache"))
    main(args)
    part = tmp_path / "cache" / part_name(1, 0)
    with pytest.raises(TeacherRecordError, match=rf"^Teacher record {part} is missing: this run's targets for epoch 1 "
                       r"of process-0 are not there \(removed since the run started\?\)"):
        main([*args, "--output_dir", str(tmp_path / "b"), "--teacher_cache_check", check], callbacks=[RemovePart(part)])
    assert not part.exists()


def test_the_digest_sees_the_order_of_the_views():
    torch.manual_seed(0)
    batch = torch.randn(8, 3, 32, 32)
    assert digests_match(digest(batch), digest(batch.clone()))
    for first, second in [(0, 1), (3, 7)]:
        order = list(range(8))
        order[first], order[second] = second, first
        assert not digests_match(digest(batch), digest(batch[order])), (first, second)


class Steps(TrainerCallback):
    def __init__(self):
        self.ended = []

    def on_step_end(self, args, state, control, **kwargs):
        self.ended.append(state.global_step)


def test_views_swapped_within_a_batch_are_refused_at_the_first_batch(small_digits_dir, random_teacher_dir, tmp_path,
                                                                      monkeypatch):
    """With Mixup off nothing but the digest ties a row's target to its view; it is compared on the first batch of
    each part, before that step's update, not at the next logging step."""
    args = tiny_run_args(small_digits_dir, random_teacher_dir, tmp_path / "a", *ONE_EPOCH_NO_EVAL,
                         "--teacher_cache", str(tmp_path / "cache"))
    main(args)
    transform = BatchTransform.__call__

    def swapping(self, pixel_values, labels, training, group_seeds=()):
        pixel_values, labels = transform(self, pixel_values, labels, training, group_seeds)
        # the first and last rows (not two neighbours: repeated augmentation's copies of one image can be alike)
        last = len(pixel_values) - 1
        return (pixel_values[[last, *range(1, last), 0]] if training else pixel_values), labels

    monkeypatch.setattr(BatchTransform, "__call__", swapping)
    steps = Steps()
    with pytest.raises(TeacherRecordError, match=r"The views of mix group 0 of epoch 0 differ"):
        main([*args, "--output_dir", str(tmp_path / "b")], callbacks=[steps])
    assert steps.ended == []


def test_a_record_of_an_older_version_is_refused_as_such(small_digits_dir, random_teacher_dir, tmp_path):
    args = tiny_run_args(small_digits_dir, random_teacher_dir, tmp_path / "a", "--teacher_cache",
                         str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "fingerprint.json").write_text(json.dumps({"format": 1, "items": {}}))
    with pytest.raises(TeacherRecordError, match=r"was recorded by an older version \(record format 1, now 3\); "
                       "record it again"):
        main(args)


def python_m(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=probe_env(), cwd=REPO,
                          timeout=300)


@pytest.mark.slow
def test_the_recording_pass_as_a_module_answers_help_and_logs_its_progress(small_digits_dir, random_teacher_dir,
                                                                            tmp_path):
    shown = python_m("training.record_teacher", "--help")
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "--teacher_cache" in shown.stdout
    recorded = python_m("training.record_teacher", *tiny_run_args(small_digits_dir, random_teacher_dir, tmp_path / "r",
                                                                  *ONE_EPOCH_NO_EVAL, "--teacher_cache",
                                                                  str(tmp_path / "cache")))
    assert recorded.returncode == 0, recorded.stderr[-3000:]
    # its progress, under its module's name rather than "__main__" (whose level no one sets)
    assert "training.record_teacher: Recorded epoch 0." in recorded.stderr
    assert "training.build: Global batch 8" in recorded.stderr


def test_a_soft_record_replays_exactly(small_digits_dir, random_teacher_dir, tmp_path, monkeypatch):
    """Top 3 logits and the other classes' shared logit, through the files and back."""
    flags = [*ONE_EPOCH_NO_EVAL, "--logging_steps", "1", "--distillation_type", "soft", "--distillation_tau", "3",
             "--teacher_cache_top_k", "3", "--teacher_cache", str(tmp_path / "cache")]
    recording = main(tiny_run_args(small_digits_dir, random_teacher_dir, tmp_path / "a", *flags))
    monkeypatch.setattr(build, "load_teacher", lambda *a, **k: pytest.fail("the teacher was loaded"))
    replaying = main(tiny_run_args(small_digits_dir, random_teacher_dir, tmp_path / "b", *flags))
    assert len(losses(replaying)) == 6 and losses(replaying) == losses(recording)
