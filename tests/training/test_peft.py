"""A LoRA adapter trained with the DistillationTrainer through `training.train.main(prepare_model=...)`."""

import pytest
import torch

from deit_hf import DeiTForImageClassificationWithTeacher
from training.train import main

from .conftest import tiny_run_args

peft = pytest.importorskip("peft")

HEADS = ["cls_classifier", "distillation_classifier"]


def test_a_lora_adapter_trains_with_the_teacher_and_saves_as_an_adapter(small_digits_dir, random_teacher_dir,
                                                                        tmp_path):
    students = []

    def with_lora(student):
        students.append({name: value.clone() for name, value in student.state_dict().items()})
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=HEADS)
        return peft.get_peft_model(student, config)

    output = tmp_path / "lora"
    trainer = main(tiny_run_args(small_digits_dir, random_teacher_dir, output, "--max_steps", "3",
                                 "--learning_rate", "1e-2", "--warmup_steps", "0", "--save_strategy", "no"),
                   prepare_model=with_lora)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {path.name for path in output.iterdir()}
    assert not (output / "model.safetensors").exists()  # the adapter, not the whole model
    assert any(entry.get("distillation_loss") for entry in trainer.state.log_history)  # the teacher taught it

    # the base weights stay as built, the adapter moved; the saved adapter on the base gives the trained model
    base = DeiTForImageClassificationWithTeacher(trainer.model.config)
    base.load_state_dict(students[0])
    trained_base = trainer.model.get_base_model().state_dict()
    assert torch.equal(trained_base["deit.encoder.layer.0.attention.attention.query.base_layer.weight"],
                       students[0]["deit.encoder.layer.0.attention.attention.query.weight"])
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        untrained = base.eval()(pixel_values=pixels).logits
        expected = trainer.model.eval()(pixel_values=pixels).logits
        loaded = peft.PeftModel.from_pretrained(base, output).eval()
        torch.testing.assert_close(loaded(pixel_values=pixels).logits, expected)
    assert not torch.allclose(untrained, expected)
