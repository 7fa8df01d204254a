"""A full disk (simulated: the write raises as it would, part of the file written) while saving a checkpoint or a part
of a teacher record: a one-line error naming the file and its flag, nothing published damaged, the staged copy gone,
and `--resume_from_checkpoint last` resumes from the newest whole checkpoint."""

import errno
import os

import pytest
import torch
from safetensors import SafetensorError
from transformers import TrainerState

from training.checkpoints import STAGING_DIR, CheckpointWriteError, last_complete_checkpoint, resume_argument
from training.teacher import store as teacher_record
from training.teacher.store import STAGING_DIR as RECORD_STAGING_DIR
from training.teacher.store import TeacherRecord, TeacherRecordWriteError, encode, part_name
from training.train import main, parse_args

from .conftest import tiny_run_args

NO_SPACE = OSError(errno.ENOSPC, "No space left on device")


def half_written(path: str, error: BaseException):
    with open(path, "wb") as file:
        file.write(b"\0" * 100)
    raise error


_torch_save = torch.save
_save_to_json = TrainerState.save_to_json


def full_on_optimizer_at_step_4(obj, path, *args, **kwargs):  # what torch.save raises when its write fails
    if str(path).endswith(os.path.join("checkpoint-4", "optimizer.pt")):
        half_written(path, RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed "
                                        "writing file data/3: file write failed"))
    return _torch_save(obj, path, *args, **kwargs)


def full_on_state_at_step_4(self, json_path):
    if self.global_step == 4:
        half_written(json_path, OSError(errno.ENOSPC, "No space left on device", json_path))
    return _save_to_json(self, json_path)


@pytest.mark.parametrize("fill", [full_on_optimizer_at_step_4, full_on_state_at_step_4], ids=["optimizer", "state"])
def test_a_full_disk_while_saving_a_checkpoint_names_it_and_leaves_the_last_whole_one(
        fill, small_digits_dir, tmp_path, monkeypatch):
    if fill is full_on_optimizer_at_step_4:
        monkeypatch.setattr(torch, "save", fill)
    else:
        monkeypatch.setattr(TrainerState, "save_to_json", fill)
    output_dir = tmp_path / "out"
    argv = tiny_run_args(small_digits_dir, None, output_dir, "--distillation_type", "none", "--max_steps", "6",
                         "--save_strategy", "steps", "--save_steps", "2", "--eval_strategy", "no",
                         "--do_eval", "false", "--resume_from_checkpoint", "last")
    with pytest.raises(CheckpointWriteError) as raised:
        main(argv)
    message = str(raised.value)
    assert "\n" not in message
    assert f"Cannot write the checkpoint {output_dir / STAGING_DIR / 'checkpoint-4'}" in message
    assert f"(--output_dir {output_dir})" in message
    assert f"rerun with --resume_from_checkpoint last to continue from {output_dir / 'checkpoint-2'}." in message
    assert not (output_dir / STAGING_DIR / "checkpoint-4").exists()  # its space freed
    assert not (output_dir / "checkpoint-4").exists()
    training_args = parse_args(argv).training
    assert resume_argument(training_args) == str(output_dir / "checkpoint-2")
    assert last_complete_checkpoint(str(output_dir)) == str(output_dir / "checkpoint-2")


def entries(rows: int) -> dict:
    return {0: (torch.tensor([1.0, 2.0]), encode(torch.randn(rows, 10), "hard", 0))}


def test_a_full_disk_while_writing_the_teacher_record_names_the_file_and_the_flag(tmp_path, monkeypatch):
    record = TeacherRecord(tmp_path / "cache", {"seed": 0})
    record.write_fingerprint(teacher={"teacher_model": "resnet18"})
    name = part_name(0, 0)
    record.save(name, entries(8))
    published = (tmp_path / "cache" / name).read_bytes()

    monkeypatch.setattr(teacher_record, "save_file", lambda tensors, path, metadata: half_written(
        path, SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
                              'left on device" })')))
    with pytest.raises(TeacherRecordWriteError) as raised:
        record.save(name, entries(9))
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"Cannot write the teacher record {tmp_path / 'cache' / name} "
                              f"(--teacher_cache {tmp_path / 'cache'}): Error while serializing")
    assert "No space left on device" in message and "--resume_from_checkpoint last" in message
    assert (tmp_path / "cache" / name).read_bytes() == published  # the published version untouched
    assert len(record.load(name)[0][1]["classes"]) == 8
    assert not list((tmp_path / "cache" / RECORD_STAGING_DIR).iterdir())

    monkeypatch.setattr(teacher_record, "open", lambda path, mode: half_written(path, NO_SPACE), raising=False)
    (tmp_path / "cache" / teacher_record.FINGERPRINT_FILE).unlink()
    with pytest.raises(TeacherRecordWriteError, match=r"Cannot write the teacher record .*fingerprint.json "
                                                      r"\(--teacher_cache .*\): \[Errno 28\] No space left"):
        record.write_fingerprint(teacher={"teacher_model": "resnet18"})
    assert not list((tmp_path / "cache" / RECORD_STAGING_DIR).iterdir())
