"""What a teacher record is of: its fingerprint (what decides the views and the targets; a record made under other
values is refused) and the mix groups a run needs of it, epoch by epoch."""

import json
import math

from deit_hf.distillation_types import get_distillation_type

from ..randomness import MixGroups
from .identity import teacher_identity
from .store import steps_per_epoch

# What the views depend on: every augmentation setting but the label smoothing (it changes the class targets only).
VIEW_SETTINGS = ("input_size", "auto_augment", "color_jitter", "train_interpolation", "reprob", "remode", "recount",
                 "hflip", "scale", "mixup", "cutmix", "mixup_prob", "mixup_switch_prob", "mixup_mode", "repeated_aug",
                 "num_repeats", "eval_crop_pct")


def uses_distribution(distill_args) -> bool:
    """Whether the record keeps the teacher's logits (top k), not only its class."""
    return get_distillation_type(distill_args.distillation_type).uses_teacher_distribution


def record_fingerprint(datasets: dict, distill_args, aug_args, training_args, student_mean, student_std,
                       teacher: str | None = None) -> dict:
    """What decides the views and the teacher's targets; a record made under other values is refused. `teacher`: the
    teacher's identity (`training.teacher.identity`), when known without hashing its weights again."""
    items = {
        "dataset": {split: getattr(dataset, "_fingerprint", None) for split, dataset in datasets.items()},
        "seed": training_args.seed,
        **{name: getattr(aug_args, name) for name in VIEW_SETTINGS},
        "global_batch": global_batch(training_args),
        "mix_group_size": aug_args.mix_group(training_args.per_device_train_batch_size),
        "dataloader_drop_last": training_args.dataloader_drop_last,
        "teacher": teacher or teacher_identity(distill_args.teacher_model, distill_args.teacher_checkpoint),
        "teacher_input_size": distill_args.teacher_input_size,
        "teacher normalisation": {"teacher": [distill_args.teacher_mean, distill_args.teacher_std],
                                  "student": [list(student_mean), list(student_std)]},
        "precision": "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else "fp32",
        "distillation_type": distill_args.distillation_type,
        **{name: getattr(distill_args, name) if uses_distribution(distill_args) else None
           for name in ("teacher_cache_top_k", "distillation_tau")},
    }
    return json.loads(json.dumps(items))  # as read back from the record's JSON (tuples become lists)


def global_batch(training_args) -> int:
    """The views of one optimizer step, over all processes and accumulated micro-batches."""
    return (training_args.per_device_train_batch_size * training_args.world_size
            * training_args.gradient_accumulation_steps)


def needed_groups(num_examples: int, aug_args, training_args) -> dict[int, range]:
    """{epoch: the mix groups of it to train} for a run's whole length (groups numbered in their epoch)."""
    per_epoch = steps_per_epoch(num_examples, global_batch(training_args), training_args.dataloader_drop_last)
    groups = MixGroups(global_batch(training_args), aug_args.mix_group(training_args.per_device_train_batch_size))
    total = training_args.max_steps if training_args.max_steps > 0 else math.ceil(
        training_args.num_train_epochs * per_epoch)
    return {epoch: groups.groups_of_steps(range(min(per_epoch, total - epoch * per_epoch)))
            for epoch in range(math.ceil(total / per_epoch))}
