"""Inference throughput of DeiT⚗: deit_hf vs transformers (eager and sdpa attention) vs timm, on the same weights.

timm's `deit_*_distilled_patch16_224` is built with its random initialisation, converted to deit_hf with
`deit_hf.convert.convert_timm_model`, and deit_hf's checkpoint is loaded into transformers' own
`DeiTForImageClassificationWithTeacher` (the parameter names are the same). Every contender classifies the same
batch; their logits are checked to agree (in float32) before anything is timed, so the figures compare the same
computation. On an accelerator the timed calls run under autocast (`dtype`, bf16 by default there) and each call
ends with a device synchronization, so its time covers its kernels.
"""

import copy
import tempfile
from collections.abc import Iterator

import timm
import torch
import transformers

from deit_hf.convert import convert_timm_model

from . import DTYPE_NAMES, Measurement, autocast, synchronize, time_interleaved

# The contenders deit_hf is compared with, in the ratios of the report.
PEERS = ("timm", "transformers eager", "transformers sdpa")
# float32 kernels of the three implementations differ in summation order only.
LOGITS_ATOL = 1e-3


def _load_transformers(model: torch.nn.Module, attn_implementation: str) -> torch.nn.Module:
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        # deit_hf's config carries the same fields, DeiT's layer_norm_eps=1e-6 included; only its model_type differs.
        config = transformers.DeiTConfig.from_dict(model.config.to_diff_dict())
        return transformers.DeiTForImageClassificationWithTeacher.from_pretrained(
            directory, config=config, attn_implementation=attn_implementation
        ).eval()


def _logits(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.logits


def build_contenders(size: str) -> dict[str, torch.nn.Module]:
    """timm, deit_hf and transformers (sdpa and eager each) DeiT-`size`⚗ at 224, all with timm's weights."""
    timm_model = timm.create_model(f"deit_{size}_distilled_patch16_224", pretrained=False).eval()
    deit_hf_model, _ = convert_timm_model(timm_model)
    deit_hf_model.set_attn_implementation("sdpa")
    # A deep copy, config included: the attention layers read the kernel from the config they share with the model.
    deit_hf_eager = copy.deepcopy(deit_hf_model)
    deit_hf_eager.set_attn_implementation("eager")
    return {
        "deit_hf sdpa": deit_hf_model.eval(),
        "deit_hf eager": deit_hf_eager.eval(),
        "timm": timm_model,
        "transformers eager": _load_transformers(deit_hf_model, "eager"),
        "transformers sdpa": _load_transformers(deit_hf_model, "sdpa"),
    }


def _check_same_logits(models: dict[str, torch.nn.Module], pixel_values: torch.Tensor) -> None:
    """float32 logits of every contender against timm's."""
    with torch.inference_mode():
        logits = {name: _logits(model(pixel_values)) for name, model in models.items()}
    reference = logits["timm"]
    for name, values in logits.items():
        difference = (values - reference).abs().max().item()
        if difference > LOGITS_ATOL:
            raise RuntimeError(f"{name}'s logits differ from timm's by {difference:.3g}: not the same model.")


def run(
    sizes: tuple[str, ...] = ("tiny", "small"),
    batch_size: int = 8,
    compile: bool = True,
    warmup: int = 2,
    repeats: int = 10,
    busy_retries: int | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Iterator[Measurement]:
    """Yield img/s of each contender per model size; deit_hf's rows carry its ratio to each peer."""
    for size in sizes:
        pixel_values = torch.randn(batch_size, 3, 224, 224, generator=torch.Generator().manual_seed(0)).to(device)
        models = {name: model.to(device) for name, model in build_contenders(size).items()}
        _check_same_logits(models, pixel_values)
        if compile:
            # Compiled separately from the eager runs; compilation happens in the warm-up rounds, never timed.
            models["deit_hf sdpa compiled"] = torch.compile(models["deit_hf sdpa"])
            models["timm compiled"] = torch.compile(models["timm"])

        def forward(model, pixel_values=pixel_values):  # bound now: the loop rebinds `pixel_values`
            def call():
                with torch.inference_mode(), autocast(pixel_values.device, dtype):
                    model(pixel_values)
                synchronize(pixel_values.device)

            return call

        timing = time_interleaved(
            {name: forward(model) for name, model in models.items()}, warmup, repeats, busy_retries
        )
        seconds = timing.seconds
        case = f"deit-{size}-distilled bs{batch_size} {DTYPE_NAMES[dtype]} 224px on {device}"
        for name, value in seconds.items():
            ratios = {}
            if name.startswith("deit_hf"):
                peers = ("timm compiled",) if name.endswith("compiled") else PEERS
                ratios = {f"ratio_vs_{peer.replace(' ', '_')}": seconds[peer] / value for peer in peers}
            yield timing.measurement("inference", case, name, batch_size, **ratios)
