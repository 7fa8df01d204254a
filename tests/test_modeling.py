"""DeiT model: parity with transformers' DeiT checkpoints, attention kernels, interpolation, round trips, training."""

import pytest
import torch
import torch.nn.functional as F
import transformers

from deit_hf import (
    DeiTConfig,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    DeiTModel,
)

from .conftest import TINY


@pytest.fixture
def transformers_checkpoint(tmp_path):
    """A folder written by transformers' own DeiTForImageClassificationWithTeacher (the hub checkpoints' format)."""
    torch.manual_seed(0)
    model = transformers.DeiTForImageClassificationWithTeacher(transformers.DeiTConfig(**TINY, layer_norm_eps=1e-6))
    with torch.no_grad():  # transformers initialises the tokens and position embeddings to zero: make them count
        for parameter in (model.deit.embeddings.cls_token, model.deit.embeddings.distillation_token,
                          model.deit.embeddings.position_embeddings):
            parameter.normal_(std=0.5)
    model.save_pretrained(tmp_path)
    return tmp_path, model.eval()


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_loads_transformers_checkpoint_with_same_logits(transformers_checkpoint, pixel_values, attn_implementation):
    path, reference = transformers_checkpoint
    model, info = DeiTForImageClassificationWithTeacher.from_pretrained(
        path, attn_implementation=attn_implementation, output_loading_info=True
    )
    assert info["missing_keys"] == set() or not info["missing_keys"]
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        ours = model.eval()(pixel_values, output_hidden_states=True)
        theirs = reference(pixel_values, output_hidden_states=True)
    for name in ("logits", "cls_logits", "distillation_logits"):
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), atol=1e-4, rtol=0)
    for mine, their in zip(ours.hidden_states, theirs.hidden_states, strict=True):
        torch.testing.assert_close(mine, their, atol=1e-4, rtol=0)


def test_interpolated_position_encoding_matches_transformers_at_non_square_size(transformers_checkpoint):
    path, reference = transformers_checkpoint
    model = DeiTForImageClassificationWithTeacher.from_pretrained(path).eval()
    pixels = torch.randn(2, 3, 40, 24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(pixels, interpolate_pos_encoding=True).logits
        theirs = reference(pixels, interpolate_pos_encoding=True).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_interpolation_at_the_trained_size_changes_nothing(tiny_config, pixel_values):
    model = DeiTForImageClassificationWithTeacher(tiny_config).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            model(pixel_values, interpolate_pos_encoding=True).logits, model(pixel_values).logits
        )


def test_wrong_image_size_says_how_to_fix_it(tiny_config):
    with pytest.raises(ValueError, match=r"\(40\*24\) doesn't match model \(32\*32\).*interpolate_pos_encoding"):
        DeiTModel(tiny_config)(torch.randn(1, 3, 40, 24))


def test_wrong_channels_are_a_clear_error(tiny_config):
    with pytest.raises(
        ValueError, match=r"Expected pixel_values of shape \(batch, 3, height, width\), got \(1, 1, 32, 32\)"
    ):
        DeiTModel(tiny_config)(torch.randn(1, 1, 32, 32))


def test_eager_equals_sdpa(pixel_values):
    eager = DeiTForImageClassificationWithTeacher._from_config(DeiTConfig(**TINY), attn_implementation="eager").eval()
    sdpa = DeiTForImageClassificationWithTeacher._from_config(DeiTConfig(**TINY), attn_implementation="sdpa").eval()
    sdpa.load_state_dict(eager.state_dict())
    assert (eager.config._attn_implementation, sdpa.config._attn_implementation) == ("eager", "sdpa")
    with torch.no_grad():
        torch.testing.assert_close(eager(pixel_values).logits, sdpa(pixel_values).logits, atol=1e-5, rtol=1e-5)


def test_sequence_is_cls_dist_patches_and_outputs_have_their_shapes(tiny_config, pixel_values):
    model = DeiTForImageClassificationWithTeacher._from_config(tiny_config, attn_implementation="eager").eval()
    with torch.no_grad():
        out = model(pixel_values, output_hidden_states=True, output_attentions=True)
        base = model.deit(pixel_values)
    tokens = (32 // 4) ** 2 + 2
    assert model.deit.embeddings.position_embeddings.shape == (1, tokens, 32)
    assert base.last_hidden_state.shape == (5, tokens, 32)
    assert len(out.hidden_states) == tiny_config.num_hidden_layers + 1
    assert [a.shape for a in out.attentions] == [(5, 4, tokens, tokens)] * tiny_config.num_hidden_layers
    # late fusion: the prediction is the mean of the class and distillation heads
    torch.testing.assert_close(out.logits, (out.cls_logits + out.distillation_logits) / 2)
    torch.testing.assert_close(out.cls_logits, model.cls_classifier(base.last_hidden_state[:, 0]))
    torch.testing.assert_close(out.distillation_logits, model.distillation_classifier(base.last_hidden_state[:, 1]))
    torch.testing.assert_close(
        out.token_cosine_similarity,
        torch.nn.functional.cosine_similarity(base.last_hidden_state[:, 0], base.last_hidden_state[:, 1], dim=-1),
    )


def test_batch_of_one_equals_its_row_of_a_batch(tiny_config, pixel_values):
    model = DeiTForImageClassificationWithTeacher(tiny_config).eval()
    with torch.no_grad():
        batch = model(pixel_values).logits
        single = model(pixel_values[3:4]).logits
    torch.testing.assert_close(single, batch[3:4], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_class", [DeiTForImageClassificationWithTeacher, DeiTForImageClassification])
def test_save_load_round_trip(tmp_path, tiny_config, pixel_values, model_class):
    model = model_class(tiny_config).eval()
    model.save_pretrained(tmp_path)
    loaded = model_class.from_pretrained(tmp_path).eval()
    saved_fields = lambda config: {k: v for k, v in config.to_dict().items() if k != "_name_or_path"}  # noqa: E731
    assert saved_fields(loaded.config) == saved_fields(model.config)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values).logits, model(pixel_values).logits, atol=0, rtol=0)


def test_auto_classes_pick_the_saved_architecture(tmp_path, tiny_config):
    for model_class in (DeiTForImageClassificationWithTeacher, DeiTForImageClassification):
        model_class(tiny_config).save_pretrained(tmp_path / model_class.__name__)
        loaded = transformers.AutoModelForImageClassification.from_pretrained(tmp_path / model_class.__name__)
        assert type(loaded) is model_class
    assert type(transformers.AutoModel.from_config(tiny_config)) is DeiTModel
    one_head = DeiTConfig(**TINY, use_distillation_token=False)  # the Auto classes' default needs the token
    assert type(transformers.AutoModelForImageClassification.from_config(one_head)) is DeiTForImageClassification


def test_forward_with_labels_trains_both_heads_and_matches_the_loss_module(tiny_config, pixel_values):
    model = DeiTForImageClassificationWithTeacher(tiny_config).train()
    labels, teacher_logits = torch.tensor([0, 1, 2, 0, 1]), torch.randn(5, 3)
    out = model(pixel_values, labels=labels, teacher_logits=teacher_logits)
    expected = model.loss_fct(out.cls_logits, labels, out.distillation_logits, teacher_logits)
    torch.testing.assert_close(out.loss, expected.loss)
    torch.testing.assert_close(out.base_loss, expected.base_loss)
    out.loss.backward()
    assert model.cls_classifier.weight.grad.abs().sum() > 0
    assert model.distillation_classifier.weight.grad.abs().sum() > 0
    assert model.deit.embeddings.distillation_token.grad.abs().sum() > 0


def test_labels_without_teacher_logits_train_both_heads_on_the_fused_logits(tiny_config, pixel_values):
    model = DeiTForImageClassificationWithTeacher(tiny_config).train()
    labels = torch.tensor([0, 1, 2, 0, 1])
    out = model(pixel_values, labels=labels)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, labels))
    out.loss.backward()
    assert model.cls_classifier.weight.grad.abs().sum() > 0
    assert model.distillation_classifier.weight.grad.abs().sum() > 0


def test_plain_transformers_trainer_fine_tunes_it(tmp_path, tiny_config):
    """No teacher, no deit_hf trainer: transformers' own Trainer trains both heads through the fused loss."""
    generator = torch.Generator().manual_seed(0)
    examples = [{"pixel_values": torch.randn(3, 32, 32, generator=generator), "labels": i % 3} for i in range(16)]
    model = DeiTForImageClassificationWithTeacher(tiny_config)
    heads_before = [model.cls_classifier.weight.clone(), model.distillation_classifier.weight.clone()]
    trainer = transformers.Trainer(
        model=model, train_dataset=examples,
        args=transformers.TrainingArguments(str(tmp_path), max_steps=4, per_device_train_batch_size=4,
                                            learning_rate=1e-2, report_to="none", use_cpu=True, save_strategy="no"),
    )
    assert trainer.train().training_loss > 0
    for before, after in zip(
        heads_before, [model.cls_classifier.weight, model.distillation_classifier.weight], strict=True
    ):
        assert not torch.equal(before, after.detach())


def test_config_distillation_settings_reach_the_loss(pixel_values):
    model = DeiTForImageClassificationWithTeacher(DeiTConfig(**TINY, distillation_type="soft", distillation_tau=2.0))
    assert (model.loss_fct.distillation_type, model.loss_fct.tau) == ("soft", 2.0)
    out = DeiTForImageClassificationWithTeacher(DeiTConfig(**TINY, distillation_type="none"))(
        pixel_values, labels=torch.zeros(5, dtype=torch.long)
    )
    assert out.distillation_loss is None and out.loss is not None
    model = DeiTForImageClassificationWithTeacher(DeiTConfig(**TINY, distillation_type="labels"))
    labels = torch.tensor([0, 1, 2, 0, 1])
    out = model(pixel_values, labels=labels)  # each head on the labels, no teacher
    torch.testing.assert_close(out.distillation_loss, F.cross_entropy(out.distillation_logits, labels))
    torch.testing.assert_close(out.loss, (out.base_loss + out.distillation_loss) / 2)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_config, pixel_values):
    torch.manual_seed(0)
    plain = DeiTForImageClassificationWithTeacher(tiny_config).train()
    checkpointed = DeiTForImageClassificationWithTeacher(tiny_config).train()
    checkpointed.load_state_dict(plain.state_dict())
    # transformers 5.23 renamed gradient_checkpointing_enable (its alias until v6); make test-compat runs older ones
    enable = getattr(checkpointed, "activation_checkpointing_enable", checkpointed.gradient_checkpointing_enable)
    enable()
    assert getattr(checkpointed, "is_activation_checkpointing", None) or checkpointed.is_gradient_checkpointing
    labels, teacher = torch.tensor([0, 1, 2, 0, 1]), torch.randn(5, 3)
    for model in (plain, checkpointed):
        model(pixel_values, labels=labels, teacher_logits=teacher).loss.backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_drop_path_grows_linearly_and_is_off_in_eval(pixel_values):
    model = DeiTForImageClassificationWithTeacher(DeiTConfig(**{**TINY, "num_hidden_layers": 3}, drop_path_rate=0.4))
    rates = [
        layer.drop_path.drop_prob if hasattr(layer.drop_path, "drop_prob") else 0.0
        for layer in model.deit.encoder.layer
    ]
    assert rates == pytest.approx([0.0, 0.2, 0.4])
    model.train()
    torch.manual_seed(0)
    first = model(pixel_values).logits
    assert not torch.allclose(first, model(pixel_values).logits)
    model.eval()
    torch.testing.assert_close(model(pixel_values).logits, model(pixel_values).logits, atol=0, rtol=0)


def _fresh_timm_state_dict(seed: int) -> dict[str, torch.Tensor]:
    from timm.models.deit import VisionTransformerDistilled

    from deit_hf.convert import convert_state_dict

    torch.manual_seed(seed)
    timm_model = VisionTransformerDistilled(
        img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4, mlp_ratio=4.0, num_classes=10
    )
    return convert_state_dict(timm_model.state_dict())


def test_initialisation_matches_timm_tensor_by_tensor():
    """Each tensor of a fresh model is drawn from the same distribution as its counterpart in a fresh timm
    VisionTransformerDistilled (two-sample Kolmogorov-Smirnov test), the patch embedding's PyTorch default included."""
    from scipy.stats import ks_2samp

    torch.manual_seed(1)
    config = DeiTConfig(image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=256, num_labels=10)
    ours = DeiTForImageClassificationWithTeacher(config).state_dict()
    reference = _fresh_timm_state_dict(seed=0)
    assert ours.keys() == reference.keys()
    for name, tensor in ours.items():
        expected = reference[name]
        if expected.std() == 0:  # zero biases, LayerNorm ones and zeros
            torch.testing.assert_close(tensor, expected, atol=0, rtol=0, msg=name)
        else:
            assert ks_2samp(tensor.flatten().numpy(), expected.flatten().numpy()).pvalue > 1e-3, name
    # The two tensors whose scale decides the early training: the patch embedding and the class token.
    patch_std = ours["deit.embeddings.patch_embeddings.projection.weight"].std().item()
    assert 0.075 < patch_std < 0.092  # kaiming-uniform(a=sqrt(5)) at fan-in 48: 1/sqrt(144) = 0.083
    assert ours["deit.embeddings.cls_token"].abs().max() < 1e-5  # normal(std=1e-6)
    assert not torch.equal(ours["deit.embeddings.cls_token"], ours["deit.embeddings.distillation_token"])


def test_initialisation_leaves_loaded_weights_alone(tmp_path, tiny_config):
    model = DeiTForImageClassificationWithTeacher(tiny_config)
    model.save_pretrained(tmp_path)
    reloaded = DeiTForImageClassificationWithTeacher.from_pretrained(tmp_path)
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name], tensor, atol=0, rtol=0, msg=name)


@pytest.mark.parametrize("model_class", [DeiTModel, DeiTForImageClassification, DeiTForImageClassificationWithTeacher])
def test_construction_on_the_meta_device(model_class):
    from accelerate import init_empty_weights

    config = DeiTConfig(**TINY, drop_path_rate=0.1)
    with torch.device("meta"):
        model = model_class(config)
    assert all(parameter.is_meta for parameter in model.parameters())
    with init_empty_weights(include_buffers=True):
        model = model_class(config)
    assert all(parameter.is_meta for parameter in model.parameters())
    # the drop-path schedule is the one built on the CPU
    rates = [getattr(layer.drop_path, "drop_prob", 0.0) for layer in model.base_model.encoder.layer]
    assert rates == pytest.approx([0.0, 0.1])


def test_without_a_distillation_token_the_sequence_is_cls_patches_and_no_weight_is_extra(tiny_config, pixel_values):
    config = DeiTConfig(**TINY, use_distillation_token=False)
    model = DeiTForImageClassification._from_config(config, attn_implementation="eager").eval()
    assert not [name for name in model.state_dict() if "distillation" in name]
    assert model.deit.embeddings.position_embeddings.shape == (1, (32 // 4) ** 2 + 1, 32)
    with torch.no_grad():
        out = model(pixel_values, output_attentions=True)
        base = model.deit(pixel_values)
    assert base.last_hidden_state.shape == (5, 65, 32)
    torch.testing.assert_close(out.logits, model.classifier(base.last_hidden_state[:, 0]))
    assert out.attentions[0].shape == (5, 4, 65, 65)
    with pytest.raises(ValueError, match="needs the distillation token.*use DeiTForImageClassification"):
        DeiTForImageClassificationWithTeacher(config)


@pytest.mark.parametrize("distillation_type", ["hard", "soft"])
def test_one_head_model_distils_its_class_head_with_a_teacher(distillation_type, pixel_values):
    model = DeiTForImageClassification(DeiTConfig(**TINY, use_distillation_token=False,
                                                  distillation_type=distillation_type, distillation_tau=2.0)).train()
    labels, teacher_logits = torch.tensor([0, 1, 2, 0, 1]), torch.randn(5, 3)
    out = model(pixel_values, labels=labels, teacher_logits=teacher_logits)
    expected = model.loss_fct(out.logits, labels, teacher_logits=teacher_logits)
    torch.testing.assert_close(out.loss, expected.loss)
    assert out.distillation_loss is not None
    with torch.no_grad():  # the teacher changes the loss: it is read, not ignored
        assert model(pixel_values, labels=labels).loss != out.loss


@pytest.mark.parametrize("model_class", [DeiTForImageClassificationWithTeacher, DeiTForImageClassification, DeiTModel])
@pytest.mark.parametrize("case", ["no labels", "distillation_type none", "distillation_type labels"])
def test_no_model_ignores_teacher_logits(model_class, case, pixel_values):
    if case == "distillation_type labels" and model_class is DeiTForImageClassification:
        model_class = DeiTForImageClassificationWithTeacher  # labels needs the second head; the config refuses one
    model = model_class(DeiTConfig(**TINY, distillation_type=case.split()[-1] if case != "no labels" else "hard"))
    labels = torch.tensor([0, 1, 2, 0, 1]) if case != "no labels" else None
    arguments = {"labels": labels} if model_class is not DeiTModel else {}
    with pytest.raises(ValueError, match="teacher_logits"):
        model(pixel_values, teacher_logits=torch.randn(5, 3), **arguments)
