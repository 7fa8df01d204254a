"""DistillationTrainer: the teacher sees the student's (mixed) batch, gets no gradient, and the student learns."""

import datasets
import pytest
import torch
from transformers import TrainingArguments

from deit_hf import DeiTConfig, DeiTForImageClassificationWithTeacher, DeiTForImageClassificationWithTeacherOutput
from training.args import AugmentationArguments
from training.collator import DistillationCollator
from training.metrics import compute_metrics, preprocess_logits_for_metrics
from training.trainer import DistillationTrainer
from training.transforms import (
    BatchTransform,
    ImageTransform,
    build_batch_transform,
    build_eval_transform,
    build_mixup,
    build_train_transform,
)

from .conftest import IMAGE_SIZE

STUDENT = dict(image_size=IMAGE_SIZE, patch_size=8, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
               intermediate_size=128, num_labels=10)


def student(**overrides):
    torch.manual_seed(0)
    return DeiTForImageClassificationWithTeacher(DeiTConfig(**{**STUDENT, **overrides}))


def prepared(split, transform):
    return split.cast_column("image", datasets.Image(decode=False)).with_transform(ImageTransform(transform))


def make_trainer(tmp_path, model, train, evaluation, teacher, **kwargs):
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=32, per_device_eval_batch_size=128, learning_rate=3e-3,
        weight_decay=0.05, num_train_epochs=kwargs.pop("epochs", 1), lr_scheduler_type="cosine", warmup_steps=0.1,
        logging_steps=5, save_strategy="no", report_to="none", remove_unused_columns=False, disable_tqdm=True,
        use_cpu=True, seed=0, torch_compile=kwargs.pop("torch_compile", False),
    )
    trainer = DistillationTrainer(
        model=model, args=args, train_dataset=train, eval_dataset=evaluation, data_collator=DistillationCollator(),
        compute_metrics=compute_metrics, preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        teacher=teacher, **kwargs,
    )
    trainer.current_gradient_accumulation_steps = 1  # set by train() at each step; some tests call training_step
    return trainer


@pytest.mark.slow
def test_distilled_student_learns_the_digits_and_follows_its_teacher(tmp_path, digits, fitted_teacher):
    augmentation = AugmentationArguments(input_size=IMAGE_SIZE, auto_augment=None, hflip=0, scale=[0.7, 1], reprob=0)
    train = prepared(digits["train"], build_train_transform(augmentation))
    held_out = prepared(digits["validation"], build_eval_transform(augmentation))
    trainer = make_trainer(tmp_path, student(), train, held_out, fitted_teacher, epochs=15)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()

    assert after["eval_teacher_top1"] > 0.9  # the teacher is real and frozen
    assert after["eval_teacher_top1"] == before["eval_teacher_top1"]
    # chance is 0.1; a broken loss, a frozen student or a swapped head stays near it
    assert after["eval_top1"] > 0.8, after
    assert after["eval_dist_teacher_agreement"] > before["eval_dist_teacher_agreement"] + 0.5, (before, after)
    assert after["eval_loss"] < before["eval_loss"] - 1.0
    # both parts of the loss are logged beside it
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and all({"base_loss", "distillation_loss"} <= entry.keys() for entry in logged)
    assert logged[-1]["distillation_loss"] < logged[0]["distillation_loss"]
    # and so are each head's top-1 on the training batches and the token cosine
    assert all({"cls_top1", "dist_top1", "token_cosine"} <= entry.keys() for entry in logged)
    assert logged[-1]["cls_top1"] > logged[0]["cls_top1"] + 0.3 and logged[-1]["dist_top1"] > logged[0]["dist_top1"]
    assert all(-1 <= entry["token_cosine"] <= 1 for entry in logged)


def test_training_accuracy_and_token_cosine_are_averaged_over_the_batches_since_the_last_log(tmp_path):
    trainer = make_trainer(tmp_path, student(distillation_type="none"), None, None, None)
    cls_logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    soft_labels = torch.tensor([[0.7, 0.3], [0.7, 0.3]])  # Mixup: the dominant class is 0 for both
    # cls head right on 1 of 2 images in both batches; distillation head on 2 of 2, then 1 of 2
    for distillation_logits, cosine in ((torch.tensor([[2.0, 0.0], [2.0, 0.0]]), 0.2), (-cls_logits, 0.4)):
        outputs = DeiTForImageClassificationWithTeacherOutput(
            cls_logits=cls_logits, distillation_logits=distillation_logits,
            token_cosine_similarity=torch.tensor([cosine, cosine]),
        )
        trainer._record_batch_means(outputs, soft_labels)
    logged = {}
    trainer.callback_handler.on_log = lambda args, state, control, logs: logged.update(logs)
    trainer.log({"loss": 1.0})
    assert logged["cls_top1"] == 0.5 and logged["dist_top1"] == 0.75 and logged["token_cosine"] == pytest.approx(0.3)
    logged.clear()
    trainer.log({"loss": 1.0})  # no batch since the last log: nothing added
    assert "cls_top1" not in logged and "token_cosine" not in logged


@pytest.mark.parametrize("distillation_type", ["none", "labels"])
def test_a_teacher_that_distillation_type_would_not_use_is_refused(tmp_path, fitted_teacher, distillation_type):
    with pytest.raises(ValueError, match=f"A teacher was given but distillation_type='{distillation_type}' would not"):
        make_trainer(tmp_path, student(distillation_type=distillation_type), None, None, fitted_teacher)


def test_teacher_sees_the_mixed_batch_and_gets_no_gradient(tmp_path, fitted_teacher, pixel_batch):
    seen = {}
    teacher_forward = fitted_teacher.forward

    def spy(pixel_values):
        seen["teacher"] = pixel_values.clone()
        return teacher_forward(pixel_values)

    model = student()
    model_forward = model.forward

    def student_spy(pixel_values, labels=None, **kwargs):
        seen["student"], seen["labels"] = pixel_values.clone(), labels.clone()
        return model_forward(pixel_values, labels=labels, **kwargs)

    mixup = build_mixup(AugmentationArguments(input_size=IMAGE_SIZE), num_classes=10)
    trainer = make_trainer(tmp_path, model, None, None, fitted_teacher, batch_transform=BatchTransform(mixup=mixup))
    fitted_teacher.forward, model.forward = spy, student_spy
    try:
        pixels, labels = pixel_batch
        trainer.training_step(model.train(), {"pixel_values": pixels.clone(), "labels": labels})
    finally:
        del fitted_teacher.forward
    assert torch.equal(seen["teacher"], seen["student"])
    assert not torch.equal(seen["student"], pixels)  # it was mixed ...
    assert seen["labels"].shape == (len(labels), 10)  # ... and its targets are soft
    assert all(parameter.grad is None for parameter in fitted_teacher.parameters())
    assert model.distillation_classifier.weight.grad is not None


def test_uint8_batches_are_normalized_on_the_device_for_training_and_evaluation(tmp_path, fitted_teacher):
    model = student()
    seen = []
    model_forward = model.forward

    def student_spy(pixel_values, **kwargs):
        seen.append(pixel_values)
        return model_forward(pixel_values, **kwargs)

    model.forward = student_spy
    aug_args = AugmentationArguments(reprob=0, mixup=0, cutmix=0)
    trainer = make_trainer(tmp_path, model, None, None, fitted_teacher, batch_transform=build_batch_transform(
        aug_args, num_classes=10, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)
    ))
    pixels = torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 32, 32)
    batch = {"pixel_values": pixels, "labels": torch.tensor([1, 2])}

    trainer.training_step(model.train(), batch)
    trainer.prediction_step(model.eval(), batch, prediction_loss_only=False)

    expected = ((torch.tensor([0, 128, 255]) / 255 - 0.5) / 0.25).view(1, 3, 1, 1).expand(2, 3, 32, 32)
    assert len(seen) == 2
    for pixel_values in seen:
        torch.testing.assert_close(pixel_values, expected)


def test_batch_with_no_decodable_image_steps_with_zero_gradients(tmp_path, fitted_teacher):
    model = student()
    trainer = make_trainer(tmp_path, model, None, None, fitted_teacher)
    loss = trainer.training_step(model.train(), DistillationCollator()([{"pixel_values": None, "labels": None}]))
    assert loss.item() == 0
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_no_weight_decay_on_tokens_norms_and_biases(tmp_path, fitted_teacher):
    model = student()
    decayed = set(make_trainer(tmp_path, model, None, None, fitted_teacher).get_decay_parameter_names(model))
    for name, _ in model.named_parameters():
        exempt = (
            name.endswith(("bias", "position_embeddings", "cls_token", "distillation_token")) or "layernorm" in name
        )
        assert (name in decayed) != exempt, name


def test_torch_compile_compiles_the_teacher_too(tmp_path, fitted_teacher):
    trainer = make_trainer(tmp_path, student(), None, None, fitted_teacher)
    assert trainer.teacher._compiled_call_impl is None
    try:
        compiled = make_trainer(tmp_path, student(), None, None, fitted_teacher, torch_compile=True)
        assert compiled.teacher._compiled_call_impl is not None
    finally:
        fitted_teacher._compiled_call_impl = None  # the session-wide fixture stays eager


def test_teacher_with_other_classes_is_refused_before_training(tmp_path, fitted_teacher):
    with pytest.raises(ValueError, match="The teacher predicts 10 classes but the student 7"):
        make_trainer(tmp_path, student(num_labels=7), None, None, fitted_teacher)


def test_distillation_without_teacher_is_refused(tmp_path):
    with pytest.raises(ValueError, match="distillation_type='hard' needs a teacher"):
        make_trainer(tmp_path, student(), None, None, None)


def test_training_without_distillation_needs_no_teacher(tmp_path, pixel_batch):
    model = student(distillation_type="none")
    trainer = make_trainer(tmp_path, model, None, None, None)
    pixels, labels = pixel_batch
    assert trainer.training_step(model.train(), {"pixel_values": pixels, "labels": labels}) > 0
    # the fused prediction's cross-entropy trains both heads, so neither stays at chance
    assert model.distillation_classifier.weight.grad.abs().sum() > 0


@pytest.fixture
def pixel_batch():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(6, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator), torch.arange(6)
