"""`DistillationTrainer`: transformers' Trainer with DeiT's teacher, Mixup/CutMix and repeated augmentation."""

import os
import shutil
from dataclasses import replace
from functools import partial

import torch
import torch.distributed as dist
from accelerate.data_loader import prepare_data_loader
from torch import nn
from transformers import Trainer
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_pt_utils import nested_gather
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, has_length, rotate_checkpoints

from .checkpoints import STAGING_DIR, last_complete_checkpoint, publish_checkpoint, writing_checkpoint
from .collator import IGNORE_INDEX, DistillationCollator
from .evaluation import EvaluationTally, fill_rows, rows_kept_by_gather
from .preemption import ignore_sigterm_in_workers
from .randomness import MixGroup, RepeatedViewSampler, SeededViews, StepSeeder, group_seed
from .skipped_images import SkippedImageCounter, slice_dispatched_batch
from .step_guard import (
    MAX_CONSECUTIVE_NONFINITE,
    NonFiniteStepGuard,
    NonFiniteTrainingError,
    poison_if_nonfinite,
    weights_are_finite,
)
from .teacher.model import Teacher
from .teacher.targets import TeacherTargets, targets_for
from .transforms import BatchTransform

# DeiT excludes these from weight decay, besides norms and biases (timm's `no_weight_decay`).
NO_DECAY_PARAMETERS = ("position_embeddings", "cls_token", "distillation_token")


class DistillationTrainer(Trainer):
    """
    Trains a `DeiTForImageClassificationWithTeacher` with the loss its config names (hard distillation by default), or
    a `DeiTForImageClassification` without distillation token (classical distillation of its one head).

    Each batch first goes through `batch_transform` on the device: uint8 pixels are normalized, and training batches
    are randomly erased and mixed (timm Mixup/CutMix). The teacher's targets for that same mixed batch come next (the
    frozen `teacher`, or a record of its targets: `teacher_targets`), then the student, whose forward computes
    `deit_hf.losses.DistillationLoss`. The teacher is kept out of `accelerator.prepare` (no DDP wrapper, no optimizer
    state, not saved) and runs under the accelerator's autocast,
    so in bf16 when mixed precision is on; `torch_compile` compiles it as well as the student. The class and
    distillation parts of the loss are logged beside `loss` (the mean over the batches that had an image), with each
    head's top-1 on the training batches (against the dominant class of Mixup's soft targets) and the cosine of the
    two output tokens.

    Reliability (see `training.step_guard` and `training.checkpoints`): an optimizer step whose loss, teacher output
    or gradient is not finite, or that had no decodable image on any process, changes nothing (weights, optimizer
    state, learning-rate schedule); the skips are counted in the logs, and `max_consecutive_nonfinite` non-finite
    steps in a row stop the run with `NonFiniteTrainingError`, as does saving non-finite weights. Each checkpoint
    appears complete or not at all.

    Args:
        teacher: the frozen teacher (`training.teacher.model.load_teacher`), run on every batch; it or `teacher_targets`
            is required when the model's `config.distillation_type` is hard or soft, refused otherwise.
        teacher_targets: where the teacher's targets come from, called once per batch
            (`training.teacher.targets`: the teacher online, or a record of its targets, `--teacher_cache`).
        batch_transform: the per-batch steps (`training.transforms.build_batch_transform`); by default ImageNet
            normalization of uint8 batches only.
        num_repeats: repeated augmentation (`training.randomness.RepeatedViewSampler`): an epoch is as many views
            as the dataset has images (rounded to whole global batches), `num_repeats` differently augmented views
            of each of `1 / num_repeats` of them, the views of an image spread over the processes as
            facebookresearch/deit's `RASampler` does; 0 or 1 turns it off. A global batch holds the same views on
            1 or N processes, and a resumed run replays the same order.
        mix_group_size: how many views of an optimizer step's global batch are erased and mixed together, from one
            seed (`training.randomness.MixGroups`); None: the per-device batch, as facebookresearch/deit mixes per
            GPU. The per-device batch must be a multiple of it.
        skipped_images: counts the images the collator dropped, into the logs and metrics, and stops a run in which
            too few decode (`training.skipped_images.SkippedImageCounter`); by default at 90 %.
        max_consecutive_nonfinite: how many non-finite steps in a row stop the run.
        own_stream_part: whether the train dataset is this process's part of a stream (see above).

    Randomness (`training.randomness`): the epoch's order, each view of an image, each mix group's random erasing and
    Mixup/CutMix, and each micro-batch's drop path are drawn from seeds derived from `args.seed` and the epoch, the
    view's position, the group, or the step, micro-batch and process: the same ones in a rerun or a resumed run, and
    the same views and groups on any layout with the same global batch and mix group size. The teacher's targets are
    asked for with the micro-batch's mix groups (`training.randomness.MixGroup`).

    With `own_stream_part`, the train dataset is this process's own part of a stream split among the processes
    (`training.data.split_stream_by_process`): its DataLoader is not split again, and the processes end each epoch
    together. One whose part has run out trains on empty batches (zero gradients, as for an all-corrupt batch) until
    every part has, so each example is seen once per epoch and the DDP collectives, optimizer steps and epoch-end
    evaluations stay in step.
    """

    def __init__(
        self,
        *args,
        teacher: Teacher | None = None,
        teacher_targets: TeacherTargets | None = None,
        batch_transform: BatchTransform | None = None,
        num_repeats: int = 0,
        skipped_images: SkippedImageCounter | None = None,
        max_consecutive_nonfinite: int = MAX_CONSECUTIVE_NONFINITE,
        own_stream_part: bool = False,
        mix_group_size: int | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.step_guard = NonFiniteStepGuard(max_consecutive_nonfinite)
        self.add_callback(self.step_guard)
        self._staging_dir: str | None = None
        self.own_stream_part = own_stream_part
        self._host_group = None  # a gloo group for the stream parts' batch counts (`get_batch_samples`)
        self.teacher_targets = teacher_targets = targets_for(self.model.config, teacher, teacher_targets)
        if teacher_targets is not None:
            teacher_targets.attach(self)
        self.teacher = teacher_targets.teacher if teacher_targets is not None else None  # None when replaying
        # The model returns a per-batch mean, not a sum over `num_items_in_batch`: the Trainer must divide it by the
        # gradient accumulation steps (it skips that for models taking **kwargs unless told).
        self.model_accepts_loss_kwargs = False
        self.batch_transform = batch_transform if batch_transform is not None else BatchTransform()
        self.num_repeats = num_repeats
        self.mix_group_size = mix_group_size or self._train_batch_size
        self.step_seeder = StepSeeder(self.args.seed, self.args.process_index)
        self._view_sampler: RepeatedViewSampler | None = None
        self.skipped_images = skipped_images if skipped_images is not None else SkippedImageCounter()
        self.add_callback(self.skipped_images)
        self.eval_tally = EvaluationTally()
        self.run_card: str | None = None  # the run card's path once `training.run_card` wrote it
        # Per-batch values kept on the device and averaged at each logging step: no host sync per step.
        self._batch_means: dict[str, list[torch.Tensor]] = {
            name: [] for name in ("loss", "base_loss", "distillation_loss", "cls_top1", "dist_top1", "token_cosine")
        }
        self._run_loss_totals = [0.0, 0.0]  # sum and count of the batch losses of the current `train()`

    def train(self, *args, **kwargs):
        self._run_loss_totals = [0.0, 0.0]
        return super().train(*args, **kwargs)

    def prepare_evaluation_batch(self, inputs: dict) -> dict:
        """An evaluation batch on the device, transformed as the student's evaluation batches are (the pre-flight's:
        `training.teacher.preflight`)."""
        return self._transform_batch(inputs, training=False)

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        # A stream's batches are dispatched from process 0 (on one process too): keep their skipped-image counts.
        # Every DataLoader's workers leave a scheduler's SIGTERM to this process (`training.preemption`).
        prepare = partial(self.accelerator.prepare_data_loader, slice_fn_for_dispatch=slice_dispatched_batch)
        self.accelerator.prepare_data_loader = lambda data_loader, *args, **kwargs: prepare(
            ignore_sigterm_in_workers(data_loader), *args, **kwargs
        )

    def get_train_dataloader(self):
        if has_length(self.train_dataset):  # read with the sampler's `SampleKey`s, each view seeded
            return self._get_dataloader(SeededViews(self.train_dataset, self.args.seed), "Training",
                                        self._train_batch_size, self._get_train_sampler, is_training=True)
        if not self.own_stream_part:
            return super().get_train_dataloader()
        accelerator = self.accelerator

        def prepare_own_part(data_loader, device_placement=None, slice_fn_for_dispatch=None):
            # accelerate would split this process's part again (`shard`, or `IterableDatasetShard` keeping one
            # process's slice of it), or read it on process 0 only and dispatch
            return prepare_data_loader(
                ignore_sigterm_in_workers(data_loader), accelerator.device, num_processes=1, process_index=0,
                dispatch_batches=False,
                put_on_device=accelerator.device_placement if device_placement is None else device_placement,
                non_blocking=accelerator.non_blocking,
            )

        prepare_dispatched = accelerator.prepare_data_loader
        accelerator.prepare_data_loader = prepare_own_part
        try:
            return super().get_train_dataloader()
        finally:
            accelerator.prepare_data_loader = prepare_dispatched

    def get_eval_dataloader(self, eval_dataset=None):
        # Evaluation batches keep their size, a skipped image as a blank row (see `training.evaluation`).
        collator, config = self.data_collator, self.model.config
        if not isinstance(collator, DistillationCollator):
            raise TypeError(f"DistillationTrainer evaluates with a DistillationCollator, not {type(collator).__name__}")
        self.data_collator = replace(collator, blank_shape=(config.num_channels, config.image_size, config.image_size))
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.data_collator = collator

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if not (self.own_stream_part and self.args.world_size > 1):
            return batch_samples, num_items_in_batch
        # The parts of a stream differ in length by up to a shard: the processes agree on how many batches this
        # step has, on the CPU (a device collective read on the host would stall the device every step).
        if self._host_group is None:
            self._host_group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        most = torch.tensor(len(batch_samples))
        dist.all_reduce(most, op=dist.ReduceOp.MAX, group=self._host_group)
        if most == 0:
            self.control.should_epoch_stop = True  # every part has run out (transformers would idle to max_steps)
            return batch_samples, num_items_in_batch
        empty = self._prepare_inputs(self.data_collator([]))
        return batch_samples + [empty] * (int(most) - len(batch_samples)), num_items_in_batch

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        self._view_sampler = RepeatedViewSampler(
            len(dataset), max(self.num_repeats, 1), self.args.seed, self.args.world_size, self._train_batch_size,
            self.args.gradient_accumulation_steps, self.mix_group_size, self.args.dataloader_drop_last,
        )
        return self._view_sampler

    def _run_epoch(self, model, epoch, train_dataloader, *args, **kwargs):
        # Here, not through the DataLoader's `set_epoch`: that misses the sampler of a resumed epoch on N processes
        # (accelerate's skipping wraps its batch sampler twice).
        if self._view_sampler is not None:
            self._view_sampler.set_epoch(epoch)
        self.step_seeder.start_epoch(epoch)
        return super()._run_epoch(model, epoch, train_dataloader, *args, **kwargs)

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        return [name for name in super().get_decay_parameter_names(model) if not name.endswith(NO_DECAY_PARAMETERS)]

    def _transform_batch(self, inputs: dict, training: bool, groups: tuple[MixGroup, ...] = ()) -> dict:
        if inputs["labels"].numel() == 0:  # nothing decoded in this batch
            return inputs
        inputs = self._prepare_inputs(inputs)  # on the device before the per-batch steps
        seeds = [(group.size, group_seed(self.args.seed, group)) for group in groups]
        pixel_values, labels = self.batch_transform(inputs["pixel_values"], inputs["labels"], training, seeds)
        return {**inputs, "pixel_values": pixel_values, "labels": labels}

    def prepare_training_batch(self, inputs: dict, step: int) -> dict:
        """Training micro-batch `inputs` of optimizer step `step` (the next of this process), as the student and
        its teacher see it: on the device, normalised, each mix group erased and mixed from its own seed; the global
        RNGs are then seeded from the micro-batch's `StepKey` for the student's own draws (drop path). Its
        `mix_groups` (`training.randomness.MixGroup`s, or none for a stream's batch, mixed whole from the `StepKey`)
        are what its teacher targets are asked for with."""
        self.step_seeder.seed_micro_batch(step)
        groups = tuple(MixGroup(*group) for group in inputs.pop("mix_groups", ()))
        inputs = self._transform_batch(inputs, training=True, groups=groups)
        if groups:
            self.step_seeder.reseed()
        return {**inputs, "mix_groups": tuple(tuple(group) for group in groups)}  # plain tuples: `_prepare_input`

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.skipped_images.record(inputs)
        inputs = self.prepare_training_batch(inputs, self.state.global_step)
        return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        groups = tuple(MixGroup(*group) for group in inputs.pop("mix_groups", ()))
        if inputs["labels"].numel() == 0 and not return_outputs:
            # Every image of this batch failed to decode (the collator dropped them). The loss of one blank image,
            # times zero, gives zero gradients through the DDP wrapper's own forward, so this process joins the
            # all-reduce the others wait for (a loss built from the parameters alone leaves DDP hanging); the
            # step guard skips the step when no process had an image.
            config = self.model.config
            blank = torch.zeros(1, config.num_channels, config.image_size, config.image_size, device=self.args.device)
            labels = torch.zeros(1, dtype=torch.int64, device=self.args.device)
            # distillation_type none or labels refuses teacher logits; a replayed run has targets but no teacher
            no_targets = self.teacher_targets is None
            if not no_targets:
                self.teacher_targets.skip(groups)  # a record notes the groups none of whose images decoded
            teacher_logits = None if no_targets else torch.zeros(1, config.num_labels, device=self.args.device)
            return model(pixel_values=blank, labels=labels, **_given(teacher_logits=teacher_logits)).loss * 0.0
        teacher_logits = None
        if self.teacher_targets is not None:
            teacher_logits = self.teacher_targets(inputs["pixel_values"], training=model.training, groups=groups)
        outputs = model(**inputs, **_given(teacher_logits=teacher_logits))
        loss = outputs.loss
        if model.training:
            self._record_batch_means(outputs, inputs["labels"])
            # a NaN/inf loss or teacher output (hard distillation's argmax would hide the latter) gives NaN gradients,
            # which `step_guard` turns into a skipped step
            loss = poison_if_nonfinite(loss, teacher_logits)
        if return_outputs and teacher_logits is not None:
            outputs["teacher_logits"] = teacher_logits.float()  # read by the metrics (teacher accuracy, agreement)
        return (loss, outputs) if return_outputs else loss

    def _record_batch_means(self, outputs, labels: torch.Tensor) -> None:
        targets = labels.argmax(dim=-1) if labels.ndim > 1 else labels  # Mixup/CutMix: the dominant class
        top1 = lambda logits: None if logits is None else (logits.argmax(dim=-1) == targets).float().mean()  # noqa: E731
        cosine = outputs.get("token_cosine_similarity")
        values = {  # a model without distillation token has one head, the class head (`logits`), and no cosine
            "loss": outputs.get("loss"),
            "base_loss": outputs.get("base_loss"),
            "distillation_loss": outputs.get("distillation_loss"),
            "cls_top1": top1(outputs.get("cls_logits", outputs.logits)),
            "dist_top1": top1(outputs.get("distillation_logits")),
            "token_cosine": None if cosine is None else cosine.mean(),
        }
        for name, value in values.items():
            if value is not None:
                self._batch_means[name].append(value.detach())

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # The outputs of the rows the model saw go back to their rows, and the loss to `eval_tally`, for batches of
        # the same size on every process (`training.evaluation`).
        labels = inputs["labels"]
        inputs, rows, counted, kept = self.evaluated_rows(inputs)
        loss, logits, _ = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        self.eval_tally.add(loss, counted, kept)
        if logits is None:
            return None, None, None
        return None, fill_rows(logits, rows), labels

    def evaluated_rows(self, inputs: dict) -> tuple[dict, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The rows of an evaluation batch that the model sees, transformed: those that decoded and that the gather
        keeps (`counted`), or, in a batch without such a row, its first one (every process gathers outputs of the
        same structure); `rows` says which they are, `kept` which rows the gather keeps."""
        labels = inputs["labels"]
        kept = rows_kept_by_gather(self.accelerator, len(labels), labels.device)
        counted = (labels != IGNORE_INDEX) & kept
        rows = counted if counted.any() else torch.arange(len(labels), device=labels.device) == 0
        inputs = {"pixel_values": inputs["pixel_values"][rows], "labels": labels[rows].clamp(min=0)}  # blank: 0
        return self._transform_batch(inputs, training=False), rows, counted, kept

    def evaluation_loop(self, *args, metric_key_prefix: str = "eval", **kwargs):
        output = super().evaluation_loop(*args, metric_key_prefix=metric_key_prefix, **kwargs)
        # the loss and image counts `prediction_step` gave the tally, summed over the processes
        output.metrics.update(self.eval_tally.take(self.accelerator, metric_key_prefix))
        return output

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs or "train_loss" in logs:  # a training log, or the end of training
            self.step_guard.sync(self.state.global_step, self.lr_scheduler)
            unlogged = self.step_guard.take_unlogged()
            logs.update(self.step_guard.totals if "train_loss" in logs else unlogged)
            # transformers' own `loss` and `train_loss` count a batch without an image as a zero loss
            means = self._take_batch_means()
            if "loss" in logs:
                del logs["loss"]  # absent when no batch since the last log had an image
                logs.update(means)
            else:
                del logs["train_loss"]
                loss_sum, count = self._run_loss_totals
                if count:
                    logs["train_loss"] = loss_sum / count
        self.skipped_images.report(logs)
        super().log(logs, start_time)

    def _take_batch_means(self) -> dict[str, float]:
        """The means of the per-batch values since the last call, over the batches that had an image, on all
        processes (one gather of each value's sum and count); the loss's sum and count join the run's totals."""
        device = self.args.device
        totals = torch.stack([
            torch.stack([torch.stack(parts).sum(), torch.tensor(float(len(parts)), device=device)]) if parts
            else torch.zeros(2, device=device)
            for parts in self._batch_means.values()
        ])
        totals = nested_gather(totals, self.args.parallel_mode).view(-1, *totals.shape).sum(0).tolist()
        means = {}
        for (name, parts), (value_sum, count) in zip(self._batch_means.items(), totals, strict=True):
            parts.clear()
            if name == "loss":
                self._run_loss_totals = [self._run_loss_totals[0] + value_sum, self._run_loss_totals[1] + count]
            if count:
                means[name] = value_sum / count if name == "loss" else round(value_sum / count, 4)
        return means

    def create_model_card(self, **kwargs) -> None:
        # `push_to_hub` uploads the run card `training.train` wrote after evaluating, not transformers' draft
        if self.run_card is None:
            super().create_model_card(**kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not weights_are_finite(self.model):
            checkpoint = last_complete_checkpoint(self.args.output_dir, self.model.state_dict().keys())
            advice = (f"The last complete checkpoint with finite weights is {checkpoint}; resume from it" if checkpoint
                      else f"{self.args.output_dir} holds no complete checkpoint with finite weights; start again")
            raise NonFiniteTrainingError(
                f"The weights are not finite at step {self.state.global_step}: not saving them to "
                f"{output_dir or self.args.output_dir}. {advice} with a lower learning rate."
            )
        super().save_model(output_dir, _internal_call)

    def _save_checkpoint(self, model, trial) -> None:
        # The schedule is rewound past skipped steps before its state is saved.
        self.step_guard.sync(self.state.global_step, self.lr_scheduler)
        run_dir = self._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staged, final = os.path.join(run_dir, STAGING_DIR, name), os.path.join(run_dir, name)
        if self.args.should_save:
            shutil.rmtree(staged, ignore_errors=True)  # left by a run killed while saving this step
        self.accelerator.wait_for_everyone()
        self._staging_dir = os.path.dirname(staged)
        try:
            with writing_checkpoint(staged, run_dir, remove=self.args.should_save):
                super()._save_checkpoint(model, trial)  # writes `staged`, through `_get_output_dir`
        finally:
            self._staging_dir = None
        if self.state.best_model_checkpoint == staged:  # transformers found the best checkpoint where it wrote it
            self.state.best_model_checkpoint = final
            if self.args.should_save:
                self.state.save_to_json(os.path.join(staged, TRAINER_STATE_NAME))
        self.accelerator.wait_for_everyone()  # every process has written its RNG state
        if self.args.should_save:
            publish_checkpoint(staged, final)
            rotate_checkpoints(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint, use_mtime=True)

    def _get_output_dir(self, trial) -> str:
        return self._staging_dir or super()._get_output_dir(trial)


def _given(**kwargs) -> dict:
    """The keyword arguments that are not None: a classifier other than DeiT (`training.train_teacher`) takes no
    `teacher_logits`."""
    return {name: value for name, value in kwargs.items() if value is not None}
