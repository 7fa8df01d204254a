"""Convert timm / facebookresearch DeiT checkpoints (DeiT⚗ and the DeiT without distillation token) into deit_hf.

    python -m deit_hf.convert --timm-model deit_small_distilled_patch16_224 \
        --checkpoint deit_small_distilled_patch16_224-649709d9.pth --output deit-small-distilled

(or `--pretrained` for timm's own weights, `--random-init` for tests) writes `model.safetensors`, `config.json`,
`preprocessor_config.json` and a model card `README.md`, loadable with
`DeiTForImageClassificationWithTeacher.from_pretrained` (`DeiTForImageClassification` for timm's non-distilled
`deit_*_patch16_*`) or, after `import deit_hf`, `AutoModelForImageClassification.from_pretrained`.
`--image-size 384` converts a 224 checkpoint for 384 px inputs, its position embedding resampled as timm's
`set_input_size` does (the interpolation of `from_pretrained(path, image_size=384)`). facebookresearch/deit builds its
models with timm, so both share timm's parameter names. The conversion is checked: the converted model must
reproduce timm's logits.

`load_state_dict_file` and `load_state_dict_strict` are also the checkpoint loaders of `training.teacher.model`.
"""

import argparse
import json
import pickle
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import timm
import torch
from safetensors import SafetensorError
from timm.data import ImageNetInfo
from timm.models import load_state_dict as timm_load_state_dict
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from .configuration_deit import DeiTConfig
from .image_processing_deit import DeiTHfImageProcessorPil
from .modelcard import conversion_facts, write_model_card
from .modeling_deit import DeiTForImageClassification, DeiTForImageClassificationWithTeacher

# Tolerance of the post-conversion check, on logits of a random image (float32 kernels differ between the two).
VERIFY_ATOL = 1e-3
DEIT_MODELS = timm.list_models("deit_*")  # with and without distillation token
_SHOWN_KEYS = 5

# timm name -> deit_hf name, as prefix rewrites; `blocks.i.attn.qkv` is split separately (see `convert_state_dict`).
_RENAMES = tuple(
    (re.compile(pattern), replacement)
    for pattern, replacement in (
        (r"^cls_token$", "deit.embeddings.cls_token"),
        (r"^dist_token$", "deit.embeddings.distillation_token"),
        (r"^pos_embed$", "deit.embeddings.position_embeddings"),
        (r"^patch_embed\.proj\.", "deit.embeddings.patch_embeddings.projection."),
        (r"^blocks\.(\d+)\.norm1\.", r"deit.encoder.layer.\1.layernorm_before."),
        (r"^blocks\.(\d+)\.attn\.proj\.", r"deit.encoder.layer.\1.attention.output.dense."),
        (r"^blocks\.(\d+)\.norm2\.", r"deit.encoder.layer.\1.layernorm_after."),
        (r"^blocks\.(\d+)\.mlp\.fc1\.", r"deit.encoder.layer.\1.intermediate.dense."),
        (r"^blocks\.(\d+)\.mlp\.fc2\.", r"deit.encoder.layer.\1.output.dense."),
        (r"^norm\.", "deit.layernorm."),
        (r"^head\.", "cls_classifier."),
        (r"^head_dist\.", "distillation_classifier."),
    )
)
_FUSED_QKV = re.compile(r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$")


def _few(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:_SHOWN_KEYS])
    return f"{shown}, ... ({len(keys)} in all)" if len(keys) > _SHOWN_KEYS else shown


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from a `.safetensors` file or a `.pth`/`.pt` file, onto the CPU.

    Torch files are read with `weights_only=True` (no arbitrary unpickling). A checkpoint that wraps the weights,
    as facebookresearch/deit's `{"model": ...}` or timm's `{"state_dict": ...}`, is unwrapped, and DDP/compile
    prefixes (`module.`, `_orig_mod.`) are stripped (timm's loader). EMA weights are ignored: the recipe evaluates
    the model itself. A file that is empty, cut short, of another format than its name says, or whose pickle holds
    more than tensors raises a ValueError naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint file at {path}.")
    if problem := unreadable_weights_file(path):
        raise ValueError(problem)
    try:
        state_dict = timm_load_state_dict(str(path), use_ema=False, device="cpu", weights_only=True)
    except (SafetensorError, pickle.UnpicklingError, RuntimeError, EOFError, OSError) as error:
        if pickle.UnpicklingError in (type(error), type(error.__cause__)):  # timm re-raises it as a RuntimeError
            raise ValueError(f"{path} holds more than tensors, refused by torch.load(weights_only=True).") from error
        raise ValueError(f"{path} is cut short or damaged: {_first_line(error)}") from error
    except AttributeError as error:  # timm's prefix cleaning calls `.items()` on whatever the file held
        raise ValueError(f"{path} does not hold a state dict (a mapping of parameter names to tensors).") from error
    not_tensors = [key for key, value in state_dict.items() if not isinstance(value, torch.Tensor)]
    if not_tensors:
        raise ValueError(
            f"{path} does not hold a state dict: entries {_few(not_tensors)} are not tensors "
            "(expected parameters at the top level or under a 'model' or 'state_dict' key)."
        )
    return state_dict


# How torch.save's files begin: a zip archive (torch >= 1.6) or a bare pickle (protocol 2 and later).
_TORCH_FILE_STARTS = (b"PK\x03\x04", b"\x80")


def unreadable_weights_file(path: str | Path) -> str | None:
    """Why the weights file `path` cannot be what its name says, in one sentence naming it, or None: empty, or a
    torch file (zip or pickle) named `.safetensors`. Truncation and bad contents show when the file is read."""
    path = Path(path)
    with open(path, "rb") as file:
        start = file.read(4)
    if not start:
        return f"{path} is empty."
    if path.suffix == ".safetensors" and start.startswith(_TORCH_FILE_STARTS):
        return (f"{path} is a torch pickle, not a safetensors file: rename it to .pth to load it with "
                "torch.load(weights_only=True).")
    return None


def nonfinite_tensors(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors of `state_dict` holding a NaN or an infinity."""
    return [name for name, tensor in state_dict.items()
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def load_state_dict_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str, target: str) -> None:
    """Load `state_dict` into `module`, all or nothing.

    Raises a ValueError naming (a few of) the missing and unexpected keys, or the keys whose shapes differ with
    both shapes, before anything is copied; `source` and `target` name the two sides in the message.
    """
    expected = module.state_dict()
    missing, unexpected = expected.keys() - state_dict.keys(), state_dict.keys() - expected.keys()
    if missing or unexpected:
        problems = ([f"missing keys: {_few(missing)}"] if missing else []) + (
            [f"unexpected keys: {_few(unexpected)}"] if unexpected else []
        )
        raise ValueError(f"{source} does not match {target}; " + "; ".join(problems) + ".")
    mismatched = [
        f"{key}: {tuple(tensor.shape)} vs {tuple(expected[key].shape)}"
        for key, tensor in sorted(state_dict.items())
        if tensor.shape != expected[key].shape
    ]
    if mismatched:
        more = f" ({len(mismatched)} in all)" if len(mismatched) > _SHOWN_KEYS else ""
        raise ValueError(
            f"Shapes in {source} do not match {target} (given vs expected): "
            + "; ".join(mismatched[:_SHOWN_KEYS])
            + more
        )
    module.load_state_dict(state_dict, strict=True)


def config_from_timm(timm_model: VisionTransformer, **overrides) -> DeiTConfig:
    """The `DeiTConfig` describing a timm DeiT (distilled or not), with ImageNet label names for 1000-class heads.

    `overrides` set fields the weights do not describe (e.g. `drop_path_rate`, `distillation_alpha`)."""
    block = timm_model.blocks[0]
    image_size, patch_size = (
        size[0] if size[0] == size[1] else list(size)
        for size in (timm_model.patch_embed.img_size, timm_model.patch_embed.patch_size)
    )
    imagenet = ImageNetInfo()
    id2label = (
        {index: imagenet.index_to_description(index) for index in range(timm_model.num_classes)}
        if timm_model.num_classes == imagenet.num_classes()
        else None
    )
    settings = {
        "hidden_size": timm_model.embed_dim,
        "num_hidden_layers": len(timm_model.blocks),
        "num_attention_heads": block.attn.num_heads,
        "intermediate_size": block.mlp.fc1.out_features,
        "qkv_bias": block.attn.qkv.bias is not None,
        "layer_norm_eps": timm_model.norm.eps,
        "image_size": image_size,
        "patch_size": patch_size,
        "num_channels": timm_model.patch_embed.proj.in_channels,
        "num_labels": timm_model.num_classes,
        "use_distillation_token": isinstance(timm_model, VisionTransformerDistilled),
        **({"id2label": id2label} if id2label else {}),
        **overrides,
    }
    if "id2label" in settings and "label2id" not in settings:
        settings["label2id"] = {name: index for index, name in settings["id2label"].items()}
    return DeiTConfig(**settings)


def convert_state_dict(timm_state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a timm DeiT state dict to deit_hf's names, splitting each fused qkv projection into q, k and v; without a
    distillation token, `head` is the one-head model's `classifier`."""
    converted, unmapped = {}, []
    for key, tensor in timm_state_dict.items():
        if fused := _FUSED_QKV.match(key):
            layer, kind = fused.groups()
            for name, part in zip(("query", "key", "value"), tensor.chunk(3, dim=0), strict=True):
                converted[f"deit.encoder.layer.{layer}.attention.attention.{name}.{kind}"] = part
            continue
        for pattern, replacement in _RENAMES:
            new_key, count = pattern.subn(replacement, key)
            if count:
                converted[new_key] = tensor
                break
        else:
            unmapped.append(key)
    if unmapped:
        raise ValueError(f"No deit_hf counterpart for timm parameters {_few(unmapped)}: unsupported DeiT variant.")
    if "dist_token" not in timm_state_dict:  # a DeiT without distillation token has one head
        converted = {re.sub(r"^cls_classifier\.", "classifier.", key): tensor for key, tensor in converted.items()}
    return converted


def _verify(timm_model: VisionTransformer, model: DeiTForImageClassification) -> None:
    config = model.config
    height, width = config.image_size if isinstance(config.image_size, list) else (config.image_size,) * 2
    pixel_values = torch.randn(1, config.num_channels, height, width, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        difference = (timm_model(pixel_values) - model(pixel_values).logits).abs().max().item()
    if difference > VERIFY_ATOL:
        raise RuntimeError(
            f"The converted model's logits differ from timm's by up to {difference:.3g} (> {VERIFY_ATOL}); "
            "the timm model uses a feature deit_hf does not reproduce."
        )


def convert_timm_model(
    timm_model: nn.Module, image_size: int | None = None, **config_overrides
) -> tuple[DeiTForImageClassification | DeiTForImageClassificationWithTeacher, DeiTHfImageProcessorPil]:
    """Convert a timm DeiT (with its current weights) into deit_hf, in eval mode: a `VisionTransformerDistilled`
    (deit_*_distilled_*) into `DeiTForImageClassificationWithTeacher`, a class-token `VisionTransformer`
    (deit_*_patch16_*) into `DeiTForImageClassification` without distillation token.

    `image_size` first moves the timm model to that input size (timm's `set_input_size`: the position embedding is
    resampled). Checks that the converted model reproduces timm's eval logits (for DeiT⚗ the mean of both heads) on a
    random image. `config_overrides` go to `config_from_timm`.
    """
    if not isinstance(timm_model, VisionTransformer) or timm_model.global_pool != "token":
        raise ValueError(
            f"{type(timm_model).__name__} is not a DeiT: deit_hf converts timm's VisionTransformerDistilled "
            "(deit_*_distilled_*) and class-token VisionTransformer (deit_*_patch16_*) models."
        )
    distilled = isinstance(timm_model, VisionTransformerDistilled)
    if distilled:
        timm_model.set_distilled_training(False)
    if image_size is not None:
        timm_model.set_input_size(img_size=(image_size, image_size))
    timm_model.eval()
    if nonfinite := nonfinite_tensors(timm_model.state_dict()):
        raise ValueError(f"The weights to convert are not finite (NaN or inf) in {_few(nonfinite)}: not converting.")
    config = config_from_timm(timm_model, **config_overrides)
    model = (DeiTForImageClassificationWithTeacher if distilled else DeiTForImageClassification)(config).eval()
    load_state_dict_strict(
        model, convert_state_dict(timm_model.state_dict()), "the converted timm weights", "the deit_hf model"
    )
    _verify(timm_model, model)
    return model, DeiTHfImageProcessorPil.for_input_size(config.image_size)


def read_label_names(path: str | Path) -> list[str]:
    """Class names from a file: a JSON list, or one name per line (blank lines ignored)."""
    text = Path(path).read_text()
    if text.lstrip().startswith("["):
        names = json.loads(text)
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            raise ValueError(f"{path} must hold a JSON list of strings.")
        return names
    return [line.strip() for line in text.splitlines() if line.strip()]


def _head_classes(state_dict: Mapping[str, torch.Tensor]) -> int | None:
    """The class count of a checkpoint's heads (both must agree), or None for a headless one."""
    counts = {key: state_dict[key].shape[0] for key in ("head.weight", "head_dist.weight") if key in state_dict}
    if len(set(counts.values())) > 1:
        raise ValueError(f"The checkpoint's heads predict different class counts: {counts}.")
    return next(iter(counts.values()), None)


def convert_timm_checkpoint(
    timm_model_name: str,
    checkpoint_path: str | Path | None = None,
    pretrained: bool = False,
    random_init: bool = False,
    label_names: list[str] | None = None,
    image_size: int | None = None,
) -> tuple[DeiTForImageClassification | DeiTForImageClassificationWithTeacher, DeiTHfImageProcessorPil]:
    """Build timm's `timm_model_name` with the weights of `checkpoint_path` (loaded strictly; its heads give the
    class count, so fine-tuned checkpoints convert), or timm's own pretrained weights (`pretrained`, fetched by
    timm), and convert it to deit_hf.

    `label_names` name the classes in order (default: ImageNet-1k's for 1000-class heads); `image_size` converts for
    another input size (see `convert_timm_model`). timm's random
    initialisation needs `random_init=True`: it is only good for testing, and must never be written by mistake.
    """
    if sum((checkpoint_path is not None, pretrained, random_init)) != 1:
        raise ValueError("Give exactly one source of weights: a checkpoint, pretrained (timm fetches the model's "
                         "own weights) or random_init (for tests only).")
    if not timm.is_model(timm_model_name):
        raise ValueError(
            f"Unknown timm model {timm_model_name!r}; timm's DeiTs are {DEIT_MODELS}."
        )
    state_dict = load_state_dict_file(checkpoint_path) if checkpoint_path is not None else None
    if state_dict is not None:
        num_classes = _head_classes(state_dict)
    else:  # timm's pretrained weights keep their head; a random one takes the names' count
        num_classes = len(label_names) if random_init and label_names is not None else None
    timm_model = timm.create_model(
        timm_model_name, pretrained=pretrained, **({"num_classes": num_classes} if num_classes is not None else {})
    )
    if not isinstance(timm_model, VisionTransformer):
        raise ValueError(f"timm model {timm_model_name!r} is not a DeiT: deit_hf converts {DEIT_MODELS}.")
    if label_names is not None and len(label_names) != timm_model.num_classes:
        raise ValueError(
            f"{len(label_names)} label names were given for weights of {timm_model.num_classes} classes."
        )
    if state_dict is not None:
        load_state_dict_strict(
            timm_model, state_dict, f"checkpoint {checkpoint_path}", f"timm model {timm_model_name!r}"
        )
    overrides = {"id2label": dict(enumerate(label_names))} if label_names is not None else {}
    return convert_timm_model(timm_model, image_size, **overrides)


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point (`deit-hf-convert`, `python -m deit_hf.convert`)."""
    parser = argparse.ArgumentParser(prog="deit-hf-convert", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--timm-model",
        required=True,
        help="timm model name, e.g. deit_base_distilled_patch16_224 or deit_base_patch16_224 (no distillation token).",
    )
    weights = parser.add_mutually_exclusive_group(required=True)
    weights.add_argument(
        "--checkpoint",
        help="timm or facebookresearch/deit weights (.pth/.pt, optionally under a 'model' key, or .safetensors); "
        "fine-tuned heads of any class count convert.",
    )
    weights.add_argument("--pretrained", action="store_true", help="Let timm fetch the model's own weights.")
    weights.add_argument("--random-init", action="store_true", help="timm's random initialisation (tests only).")
    parser.add_argument(
        "--label-names", type=Path,
        help="Class names in order: a JSON list or one name per line (default: ImageNet-1k's for 1000 classes).",
    )
    parser.add_argument(
        "--image-size", type=int,
        help="Convert for this input size (e.g. 384 from a 224 checkpoint): the position embedding is resampled.",
    )
    parser.add_argument("--output", required=True, type=Path, help="Directory to write the deit_hf checkpoint to.")
    args = parser.parse_args(argv)
    if args.output.exists() and not args.output.is_dir():
        parser.error(f"--output {args.output} is an existing file: give a directory to write the checkpoint to.")
    try:
        label_names = read_label_names(args.label_names) if args.label_names else None
        model, image_processor = convert_timm_checkpoint(
            args.timm_model, args.checkpoint, pretrained=args.pretrained, random_init=args.random_init,
            label_names=label_names, image_size=args.image_size,
        )
    except (ValueError, OSError, RuntimeError) as error:
        parser.error(str(error))
    model.save_pretrained(args.output)
    image_processor.save_pretrained(args.output)
    write_model_card(args.output, model.config, conversion_facts(
        args.timm_model, args.checkpoint, args.output, args.pretrained, args.image_size
    ))
    source = args.checkpoint or ("timm's pretrained weights" if args.pretrained else "random init")
    print(f"Wrote {args.timm_model} ({source}, {model.config.num_labels} classes) to {args.output}")


if __name__ == "__main__":
    main()
