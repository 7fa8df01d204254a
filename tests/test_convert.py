"""timm / facebookresearch DeiT⚗ -> deit_hf conversion: logit parity, checkpoint round trips, clear errors."""

import copy
import json

import pytest
import timm
import torch
from safetensors.torch import save_file
from transformers import AutoImageProcessor, AutoModelForImageClassification

from deit_hf import DeiTForImageClassification, DeiTForImageClassificationWithTeacher, DeiTHfImageProcessorPil
from deit_hf.convert import convert_timm_checkpoint, convert_timm_model, load_state_dict_file, main

# A timm DeiT⚗ small enough to convert in milliseconds, for the error paths that take a model object.
TINY_TIMM = dict(img_size=32, patch_size=4, embed_dim=32, depth=2, num_heads=4, num_classes=3)


def randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Perturb every parameter: timm's init leaves biases and LayerNorms constant, which would hide swapped keys."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model.eval()


def images(batch_size: int, size: int) -> torch.Tensor:
    return torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    "name, size, batch_size, hidden_size, num_heads",
    [
        ("deit_tiny_distilled_patch16_224", 224, 2, 192, 3),
        ("deit_small_distilled_patch16_224", 224, 2, 384, 6),
        ("deit_base_distilled_patch16_224", 224, 1, 768, 12),
        ("deit_base_distilled_patch16_384", 384, 1, 768, 12),
    ],
)
@pytest.mark.slow
def test_logits_match_timm(name, size, batch_size, hidden_size, num_heads):
    timm_model = randomized(timm.create_model(name, pretrained=False))
    model, image_processor = convert_timm_model(timm_model)

    config = model.config
    assert (config.hidden_size, config.num_attention_heads, config.num_hidden_layers) == (hidden_size, num_heads, 12)
    assert (config.intermediate_size, config.image_size, config.patch_size) == (4 * hidden_size, size, 16)
    assert config.layer_norm_eps == 1e-6
    assert config.num_labels == 1000 and config.id2label[0] == "tench, Tinca tinca"
    assert image_processor.size == {"shortest_edge": int(size / 0.875)}
    assert image_processor.crop_size == {"height": size, "width": size}

    pixel_values = images(batch_size, size)
    with torch.no_grad():
        features = timm_model.forward_features(pixel_values)
        timm_cls_logits, timm_dist_logits = timm_model.head(features[:, 0]), timm_model.head_dist(features[:, 1])
        timm_logits = timm_model(pixel_values)
        outputs = model(pixel_values)
    torch.testing.assert_close(outputs.cls_logits, timm_cls_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(outputs.distillation_logits, timm_dist_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(outputs.logits, timm_logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("file_format", ["pth", "safetensors"])
def test_checkpoint_round_trip_through_cli(tmp_path, file_format):
    name = "deit_tiny_distilled_patch16_224"
    timm_model = randomized(timm.create_model(name, pretrained=False), seed=2)
    checkpoint = tmp_path / f"weights.{file_format}"
    if file_format == "pth":  # facebookresearch/deit wraps its weights, next to optimizer state and the like
        torch.save({"model": timm_model.state_dict(), "epoch": 299}, checkpoint)
    else:
        save_file(timm_model.state_dict(), checkpoint)
    output = tmp_path / "converted"

    main(["--timm-model", name, "--checkpoint", str(checkpoint), "--output", str(output)])

    assert {"model.safetensors", "config.json", "preprocessor_config.json"} <= {p.name for p in output.iterdir()}
    pixel_values = images(2, 224)
    with torch.no_grad():
        expected = timm_model(pixel_values)
        for model in (
            DeiTForImageClassificationWithTeacher.from_pretrained(output),
            AutoModelForImageClassification.from_pretrained(output),
        ):
            assert type(model) is DeiTForImageClassificationWithTeacher
            torch.testing.assert_close(model.eval()(pixel_values).logits, expected, atol=1e-4, rtol=0)
    image_processor = AutoImageProcessor.from_pretrained(output)
    assert image_processor.size == {"shortest_edge": 256}
    assert image_processor.crop_size == {"height": 224, "width": 224}
    assert image_processor.resample == 3  # bicubic
    assert tuple(image_processor.image_mean) == pytest.approx((0.485, 0.456, 0.406))
    assert tuple(image_processor.image_std) == pytest.approx((0.229, 0.224, 0.225))


def test_random_init_conversion_only_when_asked():
    model, image_processor = convert_timm_checkpoint("deit_tiny_distilled_patch16_224", random_init=True)
    assert isinstance(model, DeiTForImageClassificationWithTeacher) and not model.training
    assert isinstance(image_processor, DeiTHfImageProcessorPil)
    assert model.config.id2label[0] == "tench, Tinca tinca"  # 1000 classes: ImageNet-1k's names by default
    with pytest.raises(ValueError, match="exactly one source of weights"):
        convert_timm_checkpoint("deit_tiny_distilled_patch16_224")


def test_cli_without_weights_refuses(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--timm-model", "deit_tiny_distilled_patch16_224", "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "one of the arguments --checkpoint --pretrained --random-init is required" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("names_format", ["json", "lines"])
def test_fine_tuned_head_converts_with_its_class_count_and_names(tmp_path, names_format):
    name = "deit_tiny_distilled_patch16_224"
    timm_model = randomized(timm.create_model(name, pretrained=False, num_classes=10), seed=3)
    save_file(timm_model.state_dict(), tmp_path / "fine_tuned.safetensors")
    names = [f"digit {i}" for i in range(10)]
    names_file = tmp_path / "names.txt"
    names_file.write_text(json.dumps(names) if names_format == "json" else "\n".join(names) + "\n\n")

    main(["--timm-model", name, "--checkpoint", str(tmp_path / "fine_tuned.safetensors"), "--label-names",
          str(names_file), "--output", str(tmp_path / "out")])

    model = DeiTForImageClassificationWithTeacher.from_pretrained(tmp_path / "out").eval()
    assert model.config.num_labels == 10 and model.config.id2label == dict(enumerate(names))
    assert model.config.label2id["digit 3"] == 3
    with torch.no_grad():
        torch.testing.assert_close(model(images(1, 224)).logits, timm_model(images(1, 224)), atol=1e-4, rtol=0)


def test_label_names_of_another_count_are_refused(tmp_path):
    timm_model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, num_classes=10)
    save_file(timm_model.state_dict(), tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match="3 label names were given for weights of 10 classes"):
        convert_timm_checkpoint("deit_tiny_distilled_patch16_224", tmp_path / "w.safetensors", label_names=list("abc"))


def test_pretrained_lets_timm_fetch_the_weights(monkeypatch):
    calls = []
    create_model = timm.create_model

    def offline_create_model(name, pretrained=False, **kwargs):
        calls.append(pretrained)
        return create_model(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline_create_model)
    model, _ = convert_timm_checkpoint("deit_tiny_distilled_patch16_224", pretrained=True)
    assert calls == [True] and model.config.num_labels == 1000


def test_loader_unwraps_and_strips_prefixes(tmp_path):
    state_dict = {"weight": torch.arange(3.0)}
    torch.save({"model": {"module.weight": state_dict["weight"]}}, tmp_path / "ddp.pth")
    assert load_state_dict_file(tmp_path / "ddp.pth").keys() == {"weight"}


def save_pth(path, state_dict):
    torch.save({"model": state_dict}, path)
    return str(path)


def test_other_architecture_names_the_keys(tmp_path):
    checkpoint = save_pth(tmp_path / "resnet.pth", timm.create_model("resnet10t", pretrained=False).state_dict())
    with pytest.raises(
        ValueError,
        match=r"does not match timm model .*missing keys: blocks\.0\..*\(155 in all\); unexpected keys: bn1\.",
    ):
        convert_timm_checkpoint("deit_tiny_distilled_patch16_224", checkpoint)


def test_non_distilled_checkpoint_names_the_missing_distillation_keys(tmp_path):
    checkpoint = save_pth(tmp_path / "deit.pth", timm.create_model("deit_tiny_patch16_224").state_dict())
    with pytest.raises(ValueError, match=r"missing keys: dist_token, head_dist\.bias, head_dist\.weight\.$"):
        convert_timm_checkpoint("deit_tiny_distilled_patch16_224", checkpoint)


@pytest.mark.parametrize(
    "name, hidden_size",
    [("deit_tiny_patch16_224", 192), ("deit_small_patch16_224", 384), ("deit_base_patch16_224", 768)],
)
@pytest.mark.slow
def test_deit_without_distillation_token_converts_to_the_one_head_model_with_timm_logits(name, hidden_size):
    timm_model = randomized(timm.create_model(name, pretrained=False))
    model, _ = convert_timm_model(timm_model)
    assert type(model) is DeiTForImageClassification and not model.config.use_distillation_token
    assert model.config.hidden_size == hidden_size and model.deit.embeddings.distillation_token is None
    assert not [key for key in model.state_dict() if "distillation" in key]
    pixel_values = images(1, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values).logits, timm_model(pixel_values), atol=1e-4, rtol=0)


def test_one_head_conversion_round_trips_through_the_cli_and_auto_class(tmp_path):
    timm_model = randomized(timm.create_model("deit_tiny_patch16_224", pretrained=False), seed=4)
    save_file(timm_model.state_dict(), tmp_path / "w.safetensors")
    main(["--timm-model", "deit_tiny_patch16_224", "--checkpoint", str(tmp_path / "w.safetensors"),
          "--output", str(tmp_path / "out")])
    model = AutoModelForImageClassification.from_pretrained(tmp_path / "out").eval()
    assert type(model) is DeiTForImageClassification
    with torch.no_grad():
        torch.testing.assert_close(model(images(1, 224)).logits, timm_model(images(1, 224)), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["deit_tiny_distilled_patch16_224", "deit_tiny_patch16_224"])
def test_conversion_at_a_larger_size_resamples_as_from_pretrained_does(name, tmp_path):
    """Converted for 64 px from a 32 px timm model: timm's own set_input_size gives the logits the converter checks,
    and loading the 32 px conversion with from_pretrained(image_size=64) gives the same model."""
    timm_model = randomized(timm.create_model(name, pretrained=False, **TINY_TIMM), seed=5)
    at32, _ = convert_timm_model(copy.deepcopy(timm_model))
    at32.save_pretrained(tmp_path / "at32")
    converted, processor = convert_timm_model(copy.deepcopy(timm_model), image_size=64)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path / "at32", image_size=64).eval()
    assert converted.config.image_size == loaded.config.image_size == 64
    assert processor.crop_size == {"height": 64, "width": 64}
    timm_model.set_input_size(img_size=(64, 64))
    with torch.no_grad():
        expected = timm_model(images(2, 64))
        torch.testing.assert_close(converted(images(2, 64)).logits, expected, atol=1e-4, rtol=0)
        torch.testing.assert_close(loaded(images(2, 64)).logits, expected, atol=1e-4, rtol=0)


def test_unknown_model_name():
    with pytest.raises(ValueError, match="Unknown timm model 'deit_huge_distilled'"):
        convert_timm_checkpoint("deit_huge_distilled", random_init=True)


def test_wrong_size_checkpoint_names_key_and_shapes(tmp_path):
    checkpoint = save_pth(tmp_path / "tiny.pth", timm.create_model("deit_tiny_distilled_patch16_224").state_dict())
    with pytest.raises(
        ValueError,
        match=r"Shapes in checkpoint .*tiny\.pth do not match timm model 'deit_small_distilled_patch16_224' "
        r"\(given vs expected\): blocks\.0\.attn\.proj\.bias: \(192,\) vs \(384,\); .*\(153 in all\)$",
    ):
        convert_timm_checkpoint("deit_small_distilled_patch16_224", checkpoint)


def test_files_that_are_not_state_dicts(tmp_path):
    with pytest.raises(FileNotFoundError, match="No checkpoint file at .*absent.pth"):
        load_state_dict_file(tmp_path / "absent.pth")
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="list.pth does not hold a state dict"):
        load_state_dict_file(tmp_path / "list.pth")
    torch.save({"epoch": 3, "weight": torch.zeros(1)}, tmp_path / "epoch.pth")
    with pytest.raises(ValueError, match="entries epoch are not tensors"):
        load_state_dict_file(tmp_path / "epoch.pth")


def test_unsupported_variants_are_refused():
    with pytest.raises(ValueError, match=r"No deit_hf counterpart for timm parameters blocks\.0\.ls1\.gamma"):
        convert_timm_model(timm.create_model("deit_tiny_distilled_patch16_224", init_values=1e-5, **TINY_TIMM))
    # same parameters, different function: only the logit check can tell
    with pytest.raises(RuntimeError, match="logits differ from timm's"):
        relu_model = timm.create_model("deit_tiny_distilled_patch16_224", act_layer="relu", **TINY_TIMM)
        convert_timm_model(randomized(relu_model))


def test_cli_reports_errors_without_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--timm-model", "resnet10t", "--random-init", "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "timm model 'resnet10t' is not a DeiT" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _cut_in_half(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


class _Payload:
    def __reduce__(self):
        return print, ("payload ran",)


@pytest.mark.parametrize("name, spoil, message", [
    ("empty.safetensors", lambda path: path.write_bytes(b""), "empty.safetensors is empty."),
    ("empty.pth", lambda path: path.write_bytes(b""), "empty.pth is empty."),
    ("cut.safetensors", _cut_in_half, "cut.safetensors is cut short or damaged: "),
    ("cut.pth", _cut_in_half, "cut.pth is cut short or damaged: "),
    ("pickle.safetensors", lambda path: torch.save({"head.weight": torch.zeros(3, 32)}, path),
     "pickle.safetensors is a torch pickle, not a safetensors file"),
    ("payload.pth", lambda path: path.write_bytes(__import__("pickle").dumps(_Payload())),
     "payload.pth holds more than tensors, refused by torch.load(weights_only=True)"),
])
def test_cli_names_a_damaged_checkpoint_file_in_one_line(tmp_path, capsys, name, spoil, message):
    checkpoint = tmp_path / name
    state_dict = timm.create_model("deit_tiny_distilled_patch16_224", **TINY_TIMM).state_dict()
    save_file(state_dict, checkpoint) if checkpoint.suffix == ".safetensors" else torch.save(state_dict, checkpoint)
    spoil(checkpoint)
    with pytest.raises(SystemExit) as exit_info:
        main(["--timm-model", "deit_tiny_distilled_patch16_224", "--checkpoint", str(checkpoint), "--output",
              str(tmp_path / "out")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"deit-hf-convert: error: {checkpoint.parent}/{message}"), error
    assert "payload ran" not in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_not_converted(tmp_path, capsys, value):
    state_dict = timm.create_model("deit_tiny_distilled_patch16_224").state_dict()
    state_dict["blocks.1.mlp.fc2.bias"][3] = value
    save_file(state_dict, tmp_path / "weights.safetensors")
    with pytest.raises(SystemExit):
        main(["--timm-model", "deit_tiny_distilled_patch16_224", "--checkpoint", str(tmp_path / "weights.safetensors"),
              "--output", str(tmp_path / "out")])
    assert "not finite (NaN or inf) in blocks.1.mlp.fc2.bias: not converting" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_existing_file_as_output_is_refused_before_converting(tmp_path, capsys):
    (tmp_path / "out").write_text("notes")
    with pytest.raises(SystemExit) as exit_info:
        main(["--timm-model", "deit_tiny_distilled_patch16_224", "--random-init", "--output", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert f"--output {tmp_path / 'out'} is an existing file" in capsys.readouterr().err
    assert (tmp_path / "out").read_text() == "notes"
