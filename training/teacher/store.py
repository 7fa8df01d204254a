"""The teacher's targets for every augmented view, on disk: recorded once, replayed by any number of students.

A record directory holds `fingerprint.json` (what decides the views and the targets: the dataset, the seed, the
augmentation, the global batch and mix group size, the teacher, the distillation type; not the processes, per-device
batch or accumulation, which change neither) and one file per epoch and recording process,
`epoch-00003.process-1.safetensors`, holding the targets of the mix groups that process saw, keyed by the group's
number in the epoch (`training.randomness.MixGroups`): a replay on any layout finds each group in whichever part of
its epoch holds it. Evaluation batches depend on the evaluation layout, so their parts name it,
`eval-2x64.process-1.safetensors` (2 processes x 64 per device), keyed by batch number: a run evaluating on another
layout records its own (or, without a teacher, needs one). Per view:

- hard distillation: the teacher's class per view, int16 (-1 for a view whose logits were not finite);
- soft distillation: the teacher's top-k logits per view, shifted so that the largest is 0, in fp16, with their class
  indices in int16, and one logit shared by every other class, in fp16, such that at the run's temperature they keep
  the teacher's leftover mass, spread evenly, as TinyViT's sparse logits do (giving them probability 0 instead, or
  a logit exact at temperature 1 only, moves the targets further from the teacher's: BENCHMARKS.md, soft records).

Beside each group's (or evaluation batch's) targets, a digest of its pixels (a fixed random projection of each view,
weighted by a fixed random factor per row position, and the norm) is kept: a group whose views differ from the
recorded ones, or come in another order, is refused instead of getting another view's targets. Files are written whole
under `.staging/` and renamed into place (complete or invisible); each carries the SHA-256 of its tensors, so a
truncated or corrupt file is an error naming it.
"""

import hashlib
import json
import math
import os
import re
from collections.abc import Iterable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from deit_hf.distillation_types import get_distillation_type

FINGERPRINT_FILE = "fingerprint.json"
STAGING_DIR = ".staging"
RECORD_FORMAT = 3  # 3: keyed by mix group, any layout; 2: the digest sees the order, the teacher named by its weights
DIGEST_TOLERANCE = 1e-4  # relative to the batch's norm: float rounding passes, a changed view does not
PART_PATTERN = re.compile(r"^epoch-(\d+)\.process-(\d+)\.safetensors$")
EMPTY_DIGEST = (0.0, 0.0)  # a mix group none of whose images decoded


class TeacherRecordError(ValueError):
    """A record that cannot be used as asked: another run's, incomplete, corrupt, or not matching the batches."""


class TeacherRecordWriteError(OSError):
    """A part of the record that could not be written (a full disk, say), named with `--teacher_cache`."""


def part_name(epoch: int, process_index: int | str) -> str:
    """The file of one recording process's targets for training epoch `epoch`."""
    return f"epoch-{epoch:05d}.process-{process_index}.safetensors"


def eval_part_name(num_processes: int, per_device_batch: int, process_index: int) -> str:
    """The file of one process's targets for the evaluation batches of a layout."""
    return f"eval-{num_processes}x{per_device_batch}.process-{process_index}.safetensors"


def steps_per_epoch(num_examples: int, global_batch: int, drop_last: bool = False) -> int:
    """Optimizer steps per epoch: `training.randomness.RepeatedViewSampler` makes an epoch whole global batches."""
    return num_examples // global_batch if drop_last else math.ceil(num_examples / global_batch)


def encode(logits: torch.Tensor, distillation_type: str, top_k: int, tau: float = 1.0) -> dict[str, torch.Tensor]:
    """A batch's teacher logits as stored (on their device); soft, for the loss at temperature `tau`."""
    logits = logits.detach().float()
    finite = logits.isfinite().all(dim=1)
    if not get_distillation_type(distillation_type).uses_teacher_distribution:
        classes = torch.where(finite, logits.argmax(dim=1), -1)
        return {"classes": classes.to(torch.int16)}
    classes = logits.shape[1]
    values, indices = logits.topk(min(top_k, classes), dim=1)
    # softmax(x / tau) gives (classes - k) exp(others / tau) = the others' sum of exp(logit / tau): their mass
    others = tau * ((logits.scatter(1, indices, -math.inf) / tau).logsumexp(1, keepdim=True)
                    - math.log(max(classes - top_k, 1)))
    # Shifted so that the largest is 0 (softmax does not change): fp16 cannot hold large logits, only differences.
    values = torch.where(finite[:, None], torch.cat([values, others], 1) - values[:, :1], math.nan).clamp(min=-65504.0)
    return {"values": values[:, :-1].to(torch.float16), "indices": indices.to(torch.int16),
            "others": values[:, -1].to(torch.float16)}


def decode(stored: dict[str, torch.Tensor], num_labels: int, device: torch.device) -> torch.Tensor:
    """Logits the loss reads as it reads the teacher's: hard, a row whose argmax is the recorded class (NaN where
    the teacher's were not finite); soft, the top-k logits in place and the others' shared logit elsewhere."""
    if "classes" in stored:
        classes = stored["classes"].to(device=device, dtype=torch.int64)
        logits = torch.zeros(len(classes), num_labels, device=device)
        logits.scatter_(1, classes.clamp(min=0)[:, None], 1.0)
        return logits.masked_fill_((classes < 0)[:, None], math.nan)
    values = stored["values"].to(device=device, dtype=torch.float32)
    indices = stored["indices"].to(device=device, dtype=torch.int64)
    others = stored["others"].to(device=device, dtype=torch.float32)
    return others[:, None].repeat(1, num_labels).scatter_(1, indices, values)


_probes: dict[tuple[int, int, torch.device], torch.Tensor] = {}


def _probe(size: int, seed: int, device: torch.device) -> torch.Tensor:
    if (size, seed, device) not in _probes:
        _probes[size, seed, device] = torch.randn(size, generator=torch.Generator().manual_seed(seed)).to(device)
    return _probes[size, seed, device]


def digest(pixel_values: torch.Tensor) -> torch.Tensor:
    """(projection, norm) of a batch: its views projected on a fixed random vector and summed with a fixed random
    weight per row position (so that views swapped within the batch change it), and its norm."""
    if len(pixel_values) == 0:
        return torch.tensor(EMPTY_DIGEST, device=pixel_values.device)
    flat = pixel_values.detach().float().flatten(1)
    rows, size = flat.shape
    projection = _probe(rows, 1, flat.device) @ (flat @ _probe(size, 0, flat.device))
    return torch.stack([projection, flat.norm()])


def digests_match(recorded: torch.Tensor, current: torch.Tensor) -> bool:
    scale = DIGEST_TOLERANCE * float(max(recorded[1], current[1])) + 1e-6
    return bool(((recorded - current).abs() <= scale).all())


def _sha256(tensors: dict[str, torch.Tensor]) -> str:
    hasher = hashlib.sha256()
    for name in sorted(tensors):
        hasher.update(name.encode())
        hasher.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()


def _ranges(steps: Iterable[int]) -> str:
    """Sorted steps as `0-5,9,12-13`."""
    spans: list[list[int]] = []
    for step in sorted(set(steps)):
        if spans and step == spans[-1][1] + 1:
            spans[-1][1] = step
        else:
            spans.append([step, step])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def _parse_ranges(text: str) -> set[int]:
    steps = set()
    for span in filter(None, text.split(",")):
        first, _, last = span.partition("-")
        steps.update(range(int(first), int(last or first) + 1))
    return steps


Entries = dict[int, tuple[torch.Tensor, dict[str, torch.Tensor]]]


class TeacherRecord:
    """One record directory: its fingerprint, and the parts of each process (see the module docstring)."""

    def __init__(self, directory: str, fingerprint: dict):
        self.directory = str(directory)
        self.fingerprint = {name: fingerprint[name] for name in sorted(fingerprint)}
        identity = json.dumps([RECORD_FORMAT, self.fingerprint]).encode()
        self.fingerprint_hash = hashlib.sha256(identity).hexdigest()[:16]

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def recorded(self) -> dict | None:
        """The directory's `fingerprint.json` ({"format", "items", "teacher"}), None when there is no record yet; one
        written by an older version of this code is refused (its digests and teacher are not comparable)."""
        path = self.path(FINGERPRINT_FILE)
        if not os.path.exists(path):
            return None
        try:
            with open(path) as file:
                recorded = json.load(file)
            if not isinstance(recorded["items"], dict):
                raise TypeError("its items are not a mapping")
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise TeacherRecordError(f"Teacher record {path} is unreadable ({type(error).__name__}: {error}); "
                                     "remove it to record again.") from None
        if recorded.get("format") != RECORD_FORMAT:
            raise TeacherRecordError(
                f"--teacher_cache {self.directory} was recorded by an older version (record format "
                f"{recorded.get('format')!r}, now {RECORD_FORMAT}); record it again (another directory, or remove it)."
            )
        return recorded

    def check_fingerprint(self) -> bool:
        """Whether the directory holds a record (False: none yet); one whose fingerprint differs is refused."""
        recorded = self.recorded()
        if recorded is None:
            return False
        recorded = recorded["items"]
        differing = [name for name in sorted(set(recorded) | set(self.fingerprint))
                     if recorded.get(name) != self.fingerprint.get(name)]
        if differing:
            details = "; ".join(f"{name}: recorded {recorded.get(name)!r}, now {self.fingerprint.get(name)!r}"
                                for name in differing)
            raise TeacherRecordError(
                f"--teacher_cache {self.directory} holds the teacher's targets of another run ({details}): use "
                "another directory, or remove it to record again."
            )
        return True

    def write_fingerprint(self, teacher: dict) -> None:
        """Create the record, naming its `teacher` (its flags: what a replay without them adopts); any process may:
        the contents are the same."""
        if not self.check_fingerprint():
            self._write(FINGERPRINT_FILE, json.dumps({"format": RECORD_FORMAT, "items": self.fingerprint,
                                                      "teacher": teacher}, indent=1).encode())

    def missing(self, needed_groups: dict[int, range], eval_parts: list[str]) -> list[str]:
        """What is absent: for each epoch some of whose `needed_groups` no part holds, its parts' pattern
        (`epoch-00003.process-*.safetensors`); and the `eval_parts` not there."""
        missing = [part_name(epoch, "*") for epoch, groups in needed_groups.items()
                   if not set(groups) <= self.recorded_groups(epoch)]
        return missing + [name for name in eval_parts if self._metadata(name) is None]

    def epoch_parts(self, epoch: int) -> list[str]:
        """The part files of training epoch `epoch`, whichever processes recorded them."""
        if not os.path.isdir(self.directory):
            return []
        return sorted(name for name in os.listdir(self.directory)
                      if (match := PART_PATTERN.match(name)) and int(match.group(1)) == epoch)

    def recorded_groups(self, epoch: int) -> set[int]:
        """The mix groups of `epoch` that its parts hold."""
        return set().union(*(_parse_ranges(self._metadata(name)["keys"]) for name in self.epoch_parts(epoch)))

    def _metadata(self, name: str) -> dict | None:
        path = self.path(name)
        if not os.path.exists(path):
            return None
        try:
            with safe_open(path, "pt") as file:
                metadata = file.metadata() or {}
        except (SafetensorError, OSError) as error:
            raise TeacherRecordError(f"Teacher record {path} is truncated or corrupt ({error}); remove it to record "
                                     "that part again.") from None
        if metadata.get("fingerprint") != self.fingerprint_hash:
            raise TeacherRecordError(f"Teacher record {path} belongs to another record (fingerprint "
                                     f"{metadata.get('fingerprint')!r}, this one {self.fingerprint_hash!r}).")
        return metadata

    def load(self, name: str) -> Entries:
        """A part's targets by key (mix group, or evaluation batch); empty when there is no such part."""
        if self._metadata(name) is None:
            return {}
        path = self.path(name)
        try:
            with safe_open(path, "pt") as file:
                tensors = {key: file.get_tensor(key) for key in file.keys()}
                metadata = file.metadata()
        except (SafetensorError, OSError) as error:
            raise TeacherRecordError(f"Teacher record {path} is truncated or corrupt ({error}).") from None
        if _sha256(tensors) != metadata.get("sha256"):
            raise TeacherRecordError(f"Teacher record {path} is corrupt (its contents do not match their checksum); "
                                     "remove it to record that part again.")
        index, digests = tensors.pop("index"), tensors.pop("digests")
        entries = {}
        for (key, start, count), batch_digest in zip(index.tolist(), digests, strict=True):
            entries[key] = batch_digest, {field: value[start:start + count] for field, value in tensors.items()}
        return entries

    def save(self, name: str, entries: Entries) -> None:
        """Write a part whole, then publish it by a rename (replacing any older version of it)."""
        if not entries:
            return
        entries = {key: (batch_digest.cpu(), {field: value.cpu() for field, value in stored.items()})
                   for key, (batch_digest, stored) in entries.items()}
        keys = sorted(entries)
        index, start = [], 0
        for key in keys:
            count = len(next(iter(entries[key][1].values())))
            index.append([key, start, count])
            start += count
        tensors = {
            "index": torch.tensor(index, dtype=torch.int64).reshape(-1, 3),
            "digests": torch.stack([entries[key][0] for key in keys]).float(),
        }
        for tensor_name in entries[keys[0]][1]:
            tensors[tensor_name] = torch.cat([entries[key][1][tensor_name] for key in keys]).contiguous()
        metadata = {"fingerprint": self.fingerprint_hash, "keys": _ranges(keys),
                    "sha256": _sha256(tensors)}
        self._publish(name, lambda staged: save_file(tensors, staged, metadata=metadata))

    def _write(self, name: str, data: bytes) -> None:
        def write(staged: str) -> None:
            with open(staged, "wb") as file:
                file.write(data)

        self._publish(name, write)

    def _publish(self, name: str, write) -> None:
        """`write(path)` the file `name` under `STAGING_DIR`, then rename it into place; a write that fails (a full
        disk) leaves the published file as it was, removes the staged copy and raises `TeacherRecordWriteError`."""
        staged = os.path.join(self.path(STAGING_DIR), f"{name}.{os.getpid()}")
        try:
            os.makedirs(self.path(STAGING_DIR), exist_ok=True)
            write(staged)
            os.replace(staged, self.path(name))
        except (OSError, SafetensorError) as error:
            if os.path.exists(staged):
                os.remove(staged)
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise TeacherRecordWriteError(
                f"Cannot write the teacher record {self.path(name)} (--teacher_cache {self.directory}): {reason}. "
                "The record's other files are as they were; make room and rerun with --resume_from_checkpoint "
                "last: the targets since that checkpoint are recorded again."
            ) from error

    def size_per_view(self) -> float:
        """Bytes on disk per recorded training view (all parts), headers included."""
        total_bytes = total_views = 0
        for name in os.listdir(self.directory):
            if PART_PATTERN.match(name):
                total_bytes += os.path.getsize(self.path(name))
                with safe_open(self.path(name), "pt") as file:
                    total_views += int(file.get_tensor("index")[:, 2].sum())
        return total_bytes / max(total_views, 1)
