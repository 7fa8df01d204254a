import pytest

from deit_hf import PRESETS, DeiTConfig


def test_defaults_are_deit_not_transformers():
    config = DeiTConfig()
    assert config.model_type == "deit_hf"
    assert config.layer_norm_eps == 1e-6
    assert (config.distillation_type, config.distillation_alpha, config.distillation_tau) == ("hard", 0.5, 1.0)


@pytest.mark.parametrize(
    "name, hidden, heads, mlp, size",
    [
        ("deit-tiny-distilled-patch16-224", 192, 3, 768, 224),
        ("deit-small-distilled-patch16-224", 384, 6, 1536, 224),
        ("deit-base-distilled-patch16-224", 768, 12, 3072, 224),
        ("deit-base-distilled-patch16-384", 768, 12, 3072, 384),
    ],
)
def test_presets_match_the_paper(name, hidden, heads, mlp, size):
    config = DeiTConfig.from_preset(name, num_labels=10)
    assert (config.hidden_size, config.num_attention_heads, config.intermediate_size) == (hidden, heads, mlp)
    assert (config.image_size, config.patch_size, config.num_hidden_layers, config.num_labels) == (size, 16, 12, 10)


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ValueError, match="deit-tiny-distilled-patch16-224"):
        DeiTConfig.from_preset("deit-huge")
    assert len(PRESETS) == 4


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(hidden_size=50, num_attention_heads=3), "hidden_size"),
        (dict(image_size=30, patch_size=4), "image_size"),
        (dict(image_size=[32, 30], patch_size=4), "image_size"),
        (dict(distillation_alpha=1.5), "distillation_alpha"),
        (dict(distillation_alpha=-0.1), "distillation_alpha"),
        (dict(distillation_type="medium"), "distillation_type"),
        (dict(distillation_type="labels", use_distillation_token=False), "distillation_type='labels'"),
        (dict(distillation_tau=0), "distillation_tau"),
        (dict(drop_path_rate=1.0), "drop_path_rate"),
        (dict(label_smoothing=-0.1), "label_smoothing"),
        (dict(num_hidden_layers=0), "num_hidden_layers"),
    ],
)
def test_nonsense_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"`{field}`"):
        DeiTConfig(**kwargs)


def test_round_trip_keeps_every_field(tmp_path):
    config = DeiTConfig(
        hidden_size=64, num_attention_heads=4, image_size=[32, 48], patch_size=8, drop_path_rate=0.1,
        distillation_type="soft", distillation_alpha=0.3, distillation_tau=3.0, label_smoothing=0.1,
        id2label={0: "cat", 1: "dog"},
    )
    config.save_pretrained(tmp_path)
    loaded = DeiTConfig.from_pretrained(tmp_path)
    for field in ("hidden_size", "image_size", "patch_size", "drop_path_rate", "distillation_type",
                  "distillation_alpha", "distillation_tau", "label_smoothing", "id2label"):
        assert getattr(loaded, field) == getattr(config, field), field


def test_a_nonsense_saved_config_fails_at_load(tmp_path):
    import json

    DeiTConfig().save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "distillation_type": "strong"}))
    with pytest.raises(ValueError, match="`distillation_type`"):
        DeiTConfig.from_pretrained(tmp_path)


def test_a_transformers_deit_folder_is_announced_once_without_the_generic_warning(tmp_path, caplog):
    import transformers

    transformers.DeiTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                            intermediate_size=64).save_pretrained(tmp_path)
    config = DeiTConfig.from_pretrained(tmp_path)
    assert config.hidden_size == 32 and config.model_type == "deit_hf"
    assert "Loading transformers' DeiT checkpoint" in caplog.text and "can yield errors" not in caplog.text
    # transformers' own resolution is untouched
    assert type(transformers.AutoConfig.from_pretrained(tmp_path)) is transformers.DeiTConfig
