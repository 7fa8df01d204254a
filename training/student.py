"""The student: a DeiT⚗ (or a DeiT without distillation token) from a preset, or a checkpoint fine-tuned at any size."""

import logging

from transformers import PreTrainedConfig

from deit_hf import DeiTConfig, DeiTForImageClassification, DeiTForImageClassificationWithTeacher

from .args import AugmentationArguments, DistillationArguments, ModelArguments

logger = logging.getLogger(__name__)


def build_student(
    model_args: ModelArguments, distill_args: DistillationArguments, aug_args: AugmentationArguments, id2label: dict
) -> DeiTForImageClassification | DeiTForImageClassificationWithTeacher:
    """A DeiT⚗ (or, with `--distillation_token false`, a DeiT without distillation token) from a preset (random init)
    or a checkpoint to fine-tune at `--input_size`, with the dataset's labels."""
    settings = dict(
        label_smoothing=aug_args.smoothing,  # reaches the loss on hard labels; Mixup's soft targets carry their own
        distillation_type=distill_args.distillation_type,
        distillation_alpha=distill_args.distillation_alpha,
        distillation_tau=distill_args.distillation_tau,
        drop_path_rate=model_args.drop_path_rate,
        id2label=id2label,
        label2id={name: index for index, name in id2label.items()},
    )
    if model_args.model_name_or_path:
        settings["image_size"] = aug_args.input_size
        return load_checkpoint_to_fine_tune(model_args.model_name_or_path, model_args.attn_implementation, settings)
    config = DeiTConfig.from_preset(
        model_args.model_preset, image_size=aug_args.input_size, **model_args.config_overrides_dict(),
        **({"use_distillation_token": False} if model_args.distillation_token is False else {}), **settings,
    )
    return student_class(config)._from_config(config, attn_implementation=model_args.attn_implementation)


def student_class(config: DeiTConfig) -> type[DeiTForImageClassification | DeiTForImageClassificationWithTeacher]:
    """DeiT⚗ (token distillation) with a distillation token, else the one-head DeiT (classical distillation)."""
    return DeiTForImageClassificationWithTeacher if config.use_distillation_token else DeiTForImageClassification


HEADS = ("cls_classifier.", "distillation_classifier.", "classifier.")


def load_checkpoint_to_fine_tune(
    path: str, attn_implementation: str, settings: dict
) -> DeiTForImageClassification | DeiTForImageClassificationWithTeacher:
    """The checkpoint with every weight but the heads loaded (or a ValueError summarising what did not load), at
    `settings["image_size"]` (position embeddings resampled); heads for another label set are new, and say so in one
    line."""
    old = DeiTConfig.from_pretrained(path)
    source_type = PreTrainedConfig.get_config_dict(path)[0].get("model_type")
    if settings["image_size"] != old.image_size:
        logger.info("Fine-tuning at %d px from %s, trained at %s px: its position embeddings are resampled.",
                    settings["image_size"], path, old.image_size)
    try:
        model, report = student_class(old).from_pretrained(
            path, attn_implementation=attn_implementation, ignore_mismatched_sizes=True, output_loading_info=True,
            **settings,
        )
    except OSError as error:  # no such Hub model, or no weights in the directory
        raise ValueError(f"--model_name_or_path {path!r}: {error}") from error
    problems = {
        "missing": [key for key in report["missing_keys"] if not key.startswith(HEADS)],
        "unexpected": list(report["unexpected_keys"]),
        "of another shape": [entry[0] for entry in report["mismatched_keys"] if not entry[0].startswith(HEADS)],
    }
    if any(problems.values()):
        summary = "; ".join(
            f"{len(keys)} {kind} ({', '.join(sorted(keys)[:3])}{', ...' if len(keys) > 3 else ''})"
            for kind, keys in problems.items() if keys
        )
        raise ValueError(
            f"{path} (model_type {source_type!r}) is not a DeiT checkpoint deit_hf can fine-tune: weights {summary}."
        )
    new_names = settings["id2label"]
    if old.num_labels != len(new_names) or [old.id2label[i] for i in range(old.num_labels)] != list(new_names.values()):
        few = lambda names: ", ".join(map(str, list(names)[:3])) + (", ..." if len(names) > 3 else "")  # noqa: E731
        logger.info("New heads: %d classes (%s) -> %d classes from the dataset (%s).", old.num_labels,
                    few(old.id2label.values()), len(new_names), few(new_names.values()))
    return model
