"""The model card a training run writes into its `output_dir`: the run's per-head metrics, its teacher and recipe."""

from pathlib import Path

from huggingface_hub import ModelCard

from deit_hf import DeiTConfig
from deit_hf.distillation_types import get_distillation_type
from deit_hf.modelcard import CardFacts, render_card

from .args import AugmentationArguments, DataArguments, DistillationArguments, ModelArguments
from .trainer import DistillationTrainer


def last_evaluation(log_history: list[dict]) -> dict[str, float] | None:
    """The metrics of the run's latest evaluation in the Trainer's log history (`eval_*` keys), or None."""
    evaluations = [entry for entry in log_history if "eval_top1" in entry]
    return {key: value for key, value in evaluations[-1].items() if key.startswith("eval_")} if evaluations else None


def run_card_facts(
    trainer: DistillationTrainer,
    model_args: ModelArguments,
    distill_args: DistillationArguments,
    data_args: DataArguments,
    aug_args: AugmentationArguments,
) -> CardFacts:
    """What the run did, read from its arguments and the trainer's state (the values used, after the recipe's rules)."""
    args, state = trainer.args, trainer.state
    dataset = data_args.dataset_name or data_args.train_dir
    start = (
        _fine_tuned(model_args.model_name_or_path, aug_args.input_size) if model_args.model_name_or_path
        else f"trained from scratch (random init) as `{model_args.model_preset}`"
        + (f" with `{model_args.config_overrides}`" if model_args.config_overrides else "")
        + (" without distillation token" if not trainer.model.config.use_distillation_token else "")
    )
    two_heads = trainer.model.config.use_distillation_token
    teacher = None
    distillation = get_distillation_type(distill_args.distillation_type)
    if distillation.uses_teacher:
        checkpoint = distill_args.teacher_checkpoint
        weights = f" (weights: `{Path(checkpoint).name}`)" if checkpoint else ""
        softness = f", τ = {distill_args.distillation_tau}" if distillation.uses_teacher_distribution else ""
        kind = "" if two_heads else " (classical distillation of the class head: no distillation token)"
        size = distill_args.teacher_input_size
        weights += f", fed {size} px images (resized from the student's {aug_args.input_size} px)" if size else ""
        teacher = (
            f"`{distill_args.teacher_model}`{weights}, {distill_args.distillation_type} distillation{kind}, "
            f"α = {distill_args.distillation_alpha}{softness}"
        )
    global_batch = args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps
    # a stream's length is unknown: transformers counts max_steps as one epoch
    epochs = "the stream's epochs are not counted" if data_args.streaming else f"{state.epoch:g} epochs"
    recipe = {
        "steps": f"{state.global_step} × {global_batch} images ({state.global_step * global_batch:,} images, {epochs})",
        "global batch": f"{global_batch} ({args.world_size} process(es))",
        "optimizer": f"{_name(args.optim)}, lr {args.learning_rate:.3g}, weight decay {args.weight_decay}, "
        f"{_name(args.lr_scheduler_type)} schedule, {args.get_warmup_steps(state.max_steps)} warm-up steps",
        "gradient clipping": f"{args.max_grad_norm}" if args.max_grad_norm else "none",
        "augmentation": f"{aug_args.input_size} px, RandAugment {aug_args.auto_augment or 'off'}, crop scale "
        f"{tuple(aug_args.scale)}, hflip {aug_args.hflip}, random erasing {aug_args.reprob}",
        "mixing": f"Mixup {aug_args.mixup} / CutMix {aug_args.cutmix}, label smoothing {aug_args.smoothing}",
        "repeated augmentation": f"×{aug_args.num_repeats}" if aug_args.repeated_aug else "off",
        "stochastic depth": f"{model_args.drop_path_rate}",
        "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        "skipped images": _skipped_images(state.log_history),
    }
    return CardFacts(
        title=f"{'DeiT⚗' if two_heads else 'DeiT'} trained with deit-hf on {dataset}",
        source=f"Written by `training.train` at the end of its run: {start}, on {dataset}.",
        model_id=args.output_dir,
        dataset=dataset,
        dataset_on_hub=data_args.dataset_name is not None and not Path(data_args.dataset_name).exists(),
        evaluation=last_evaluation(state.log_history),
        evaluated_on=f"`{data_args.validation_dir}`" if data_args.validation_dir else None,
        teacher=teacher or _no_teacher(distill_args.distillation_type, two_heads),
        recipe=recipe,
    )


def _skipped_images(log_history: list[dict]) -> str:
    """The images that did not decode (or were out of bounds) in training and in the last evaluation."""
    trained = next((entry["train_skipped_images"] for entry in reversed(log_history)
                    if "train_skipped_images" in entry), None)
    evaluation = last_evaluation(log_history) or {}
    training = "not counted" if trained is None else f"{trained}"
    validation = (f"{evaluation['eval_skipped_images']} of {evaluation['eval_images']}"
                  if "eval_images" in evaluation else "not evaluated")
    return f"training: {training}; validation: {validation}"


def _no_teacher(distillation_type: str, two_heads: bool) -> str:
    kind = get_distillation_type(distillation_type)
    if kind.needs_distillation_token or two_heads:
        return f"none (distillation_type {kind.name}: {kind.description})"
    return f"none (distillation_type {kind.name}: the class head learns the labels)"


def _fine_tuned(checkpoint: str, input_size: int) -> str:
    trained_at = DeiTConfig.from_pretrained(checkpoint).image_size
    trained_at = trained_at if isinstance(trained_at, int) else "x".join(map(str, trained_at))
    return f"fine-tuned at {input_size} px from `{checkpoint}`, trained at {trained_at} px"


def _name(choice) -> str:
    return getattr(choice, "value", choice)  # TrainingArguments turns some choices into enums


def run_card(trainer: DistillationTrainer, model_args, distill_args, data_args: DataArguments, aug_args) -> ModelCard:
    """The run's card: `deit_hf.modelcard`'s, its `model-index` naming the split the run was evaluated on."""
    card = ModelCard(render_card(trainer.model.config,
                                 run_card_facts(trainer, model_args, distill_args, data_args, aug_args)))
    for result in card.data.eval_results or []:  # the run's own measurement (a run card has no paper figure)
        if data_args.validation_dir is not None:
            result.dataset_type = result.dataset_name = data_args.validation_dir
        else:
            result.dataset_split = data_args.validation_split
    return card


def write_run_card(trainer: DistillationTrainer, *arguments) -> Path | None:
    """Write the run's card as `README.md` into `output_dir` on the main process (the others return None).

    `arguments` are the run's `ModelArguments`, `DistillationArguments`, `DataArguments`, `AugmentationArguments`."""
    if not trainer.is_world_process_zero():
        return None
    path = Path(trainer.args.output_dir) / "README.md"
    run_card(trainer, *arguments).save(path)
    trainer.run_card = str(path)  # what `push_to_hub` uploads as the card (`DistillationTrainer.create_model_card`)
    return path
