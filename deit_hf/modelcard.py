"""Model cards (the Hub's `README.md`) for DeiT⚗ checkpoints, generated from their configs and facts.

    python -m deit_hf.modelcard            # writes model_cards/<preset>/README.md for the four presets
    python -m deit_hf.modelcard --check    # exits 1 naming the committed cards that are stale

`preset_card` describes a released configuration (the paper's architecture, the authors' weights converted to this
format); `write_model_card` (the converter) and `render_card` (the training script's run card) describe the
checkpoint they write with its own facts (`CardFacts`): where the weights came from, the run's evaluation, its teacher
and recipe. Parameter counts are computed from the config (the model built on the meta device), never typed.
"""

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub import EvalResult, ModelCardData

from .configuration_deit import PRESETS, DeiTConfig
from .image_processing_deit import DeiTHfImageProcessorPil
from .modeling_deit import DeiTForImageClassification, DeiTForImageClassificationWithTeacher

PAPER = "Touvron et al. 2021 (DeiT)"
PAPER_URL = "https://arxiv.org/abs/2012.12877"
# The Hub organisation the preset cards are written for: their snippets load `HUB_ORGANISATION/<preset>`.
HUB_ORGANISATION = "deit-hf"
IMAGENET = "ILSVRC/imagenet-1k"
CARDS_DIR = Path(__file__).resolve().parent.parent / "model_cards"


@dataclass(frozen=True)
class PaperResult:
    """The paper's ImageNet-1k validation top-1 (%) for the authors' weights of one preset, and their epochs."""

    display_name: str
    top1: float
    epochs: int


PAPER_RESULTS = {
    "deit-tiny-distilled-patch16-224": PaperResult("DeiT-Ti⚗", 74.5, 300),
    "deit-small-distilled-patch16-224": PaperResult("DeiT-S⚗", 81.2, 300),
    "deit-base-distilled-patch16-224": PaperResult("DeiT-B⚗", 83.4, 300),
    "deit-base-distilled-patch16-384": PaperResult("DeiT-B⚗↑384", 85.2, 1000),
}
PAPER_RECIPE = {
    "teacher": "RegNetY-16GF (82.9 % top-1), hard distillation, α = 0.5, on the same augmented batch",
    "optimizer": "AdamW, lr 5e-4 × batch / 512, weight decay 0.05, cosine schedule, 5 warm-up epochs",
    "augmentation": "RandAugment rand-m9-mstd0.5-inc1, random-resized crop, Mixup 0.8 / CutMix 1.0, label smoothing "
    "0.1, random erasing 0.25, repeated augmentation ×3",
    "regularisation": "stochastic depth 0.1",
    "batch": "1024 images on 8 GPUs",
}
TAGS = ["image-classification", "vision", "deit", "knowledge-distillation", "deit-hf", "custom_code"]
CITATION = (
    r"""@inproceedings{touvron2021training,
  title     = {Training data-efficient image transformers \& distillation through attention},
  author    = {Touvron, Hugo and Cord, Matthieu and Douze, Matthijs and Massa, Francisco and """
    r"""Sablayrolles, Alexandre and J{\'e}gou, Herv{\'e}},
  booktitle = {International Conference on Machine Learning},
  year      = {2021}
}"""
)


@dataclass
class CardFacts:
    """What a card says about one checkpoint beyond its config.

    Args:
        title: the card's heading.
        source: a Markdown paragraph saying where the weights come from.
        model_id: what the snippets load: a Hub repository id or the checkpoint's folder.
        paper_preset: the `PRESETS` name whose paper top-1 goes into `model-index` (only for the authors' weights).
        dataset: the dataset the weights were trained and evaluated on (Hub name or a description).
        dataset_on_hub: whether `dataset` is a Hub dataset id (the metadata's `datasets` lists only those).
        evaluation: metrics this checkpoint was measured at (`training.metrics` names, fractions of 1), or None.
        evaluated_on: what `evaluation` was measured on; None: the validation split of `dataset`.
        teacher: the distillation teacher of a training run, or None.
        recipe: the run's settings (name -> value), or None for the paper's.
    """

    title: str
    source: str
    model_id: str
    paper_preset: str | None = None
    dataset: str = IMAGENET
    dataset_on_hub: bool = True
    evaluation: dict[str, float] | None = None
    evaluated_on: str | None = None
    teacher: str | None = None
    recipe: dict[str, str] | None = field(default=None)


def count_parameters(config: DeiTConfig) -> int:
    """Parameters of the config's classifier (`DeiTForImageClassificationWithTeacher`, or `DeiTForImageClassification`
    without distillation token), counted without allocating them."""
    with torch.device("meta"):
        model = (DeiTForImageClassificationWithTeacher if config.use_distillation_token else
                 DeiTForImageClassification)(config)
    return sum(parameter.numel() for parameter in model.parameters())


def preset_card(preset: str) -> str:
    """The card of a released configuration: the authors' weights, converted by `deit-hf-convert`."""
    paper = PAPER_RESULTS[preset]
    timm_name = preset.replace("-", "_")
    facts = CardFacts(
        title=f"{paper.display_name} (`{preset}`) in deit-hf's format",
        source=(
            f"The authors' ImageNet-1k weights of `{timm_name}`, converted to deit-hf's format with\n"
            f"`deit-hf-convert --timm-model {timm_name} --pretrained` (timm fetches the authors' weights; or "
            "`--checkpoint <the authors' .pth>`); the converter checks that "
            "the converted model reproduces timm's logits."
            + (_UPSAMPLED_PATH if preset.endswith("384") else "")
        ),
        model_id=f"{HUB_ORGANISATION}/{preset}",
        paper_preset=preset,
    )
    return render_card(DeiTConfig.from_preset(preset, num_labels=1000), facts)


def conversion_facts(
    timm_model_name: str, checkpoint: str | Path | None, output: str | Path, pretrained: bool = False,
    image_size: int | None = None,
) -> CardFacts:
    """The facts of a `deit-hf-convert` output: the timm architecture and the weights file it was given.

    The paper's top-1 is not put into `model-index` here: the converter cannot tell the authors' weights from a
    fine-tuned or other checkpoint of the same architecture."""
    if checkpoint is not None:
        weights = f"the weights of `{Path(checkpoint).name}`"
    elif pretrained:
        weights = f"timm's pretrained weights for `{timm_model_name}`"
    else:
        weights = "**timm's random initialisation** (`--random-init`: for testing the conversion, not a trained model)"
    resized = (f" for {image_size} px inputs (`--image-size {image_size}`: the position embedding resampled as timm's "
               "`set_input_size` does; fine-tune at that size for accuracy)" if image_size is not None else "")
    return CardFacts(
        title=f"`{timm_model_name}` converted to deit-hf's format",
        source=f"timm's `{timm_model_name}` with {weights}, converted by `deit-hf-convert`{resized}, which checked "
        "that the converted model reproduces timm's logits.",
        model_id=str(output),
    )


def render_card(config: DeiTConfig, facts: CardFacts) -> str:
    """The card's Markdown: YAML metadata in the Hub's format (with `model-index`), then its sections."""
    sections = [
        _metadata(facts).to_yaml(),
        f"# {facts.title}\n\n{facts.source}",
        _architecture(config),
        _INTENDED_USE,
        _HOW_IT_WORKS if config.use_distillation_token else _ONE_HEAD,
        _usage(facts.model_id, config.use_distillation_token),
        _training(facts),
        _evaluation(facts, config.use_distillation_token),
        _LIMITATIONS,
        f"## Citation\n\n```bibtex\n{CITATION}\n```",
    ]
    return "---\n" + sections[0].rstrip("\n") + "\n---\n\n" + "\n\n".join(sections[1:]) + "\n"


def write_model_card(directory: str | Path, config: DeiTConfig, facts: CardFacts) -> Path:
    """Write the card as `README.md` into `directory` (a checkpoint folder); returns its path."""
    path = Path(directory) / "README.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_card(config, facts), encoding="utf-8")
    return path


def _metadata(facts: CardFacts) -> ModelCardData:
    results = []
    if facts.paper_preset is not None:
        results.append(_result(IMAGENET, "ImageNet-1k", PAPER_RESULTS[facts.paper_preset].top1, PAPER, PAPER_URL))
    if facts.evaluation is not None:
        results.append(_result(facts.dataset, facts.dataset, round(100 * facts.evaluation["eval_top1"], 2)))
    return ModelCardData(
        license="apache-2.0",
        # The code is deit-hf's: `import deit_hf`, or transformers with trust_remote_code (the `custom_code` tag).
        library_name="deit-hf",
        tags=TAGS,
        pipeline_tag="image-classification",
        datasets=[facts.dataset] if facts.dataset_on_hub else None,
        model_name=facts.model_id.rsplit("/", 1)[-1],
        eval_results=results or None,
    )


def _result(dataset: str, name: str, top1: float, source: str | None = None, url: str | None = None) -> EvalResult:
    return EvalResult(
        task_type="image-classification", dataset_type=dataset, dataset_name=name, dataset_split="validation",
        metric_type="accuracy", metric_name="top-1 (%)", metric_value=top1, source_name=source, source_url=url,
    )


def _architecture(config: DeiTConfig) -> str:
    processor = DeiTHfImageProcessorPil.for_input_size(config.image_size)
    parameters = count_parameters(config)
    return "\n".join([
        "| | |", "|---|---|",
        f"| parameters | {parameters / 1e6:.1f} M ({parameters:,}, "
        f"{'both heads' if config.use_distillation_token else 'one head, no distillation token'}) |",
        f"| layers / width / heads | {config.num_hidden_layers} / {config.hidden_size} / {config.num_attention_heads}"
        f" (MLP {config.intermediate_size}) |",
        f"| input | {config.image_size} px, patch {config.patch_size}, {config.num_labels} classes |",
        f"| eval transform | shortest edge {processor.size['shortest_edge']} bicubic, center crop "
        f"{processor.crop_size['height']}, mean {processor.image_mean} / std {processor.image_std} |",
    ])


_INTENDED_USE = """## Intended use

Image classification into the checkpoint's classes, and a backbone to fine-tune (`DeiTModel` or the
class-token head `DeiTForImageClassification` load from the same folder). Training with a teacher needs the
deit-hf package (`training.train`)."""

_HOW_IT_WORKS = """## How the distillation token works

Beside the class token, DeiT⚗ learns a **distillation token**: the sequence is `[cls, dist, patches]`, each with
its own position embedding, through pre-norm transformer blocks. Two linear heads read the two output tokens: the
class head learns the labels, the distillation head learns the teacher's predictions (its argmax, for hard
distillation). At inference the two heads are fused late: `logits = (cls_logits + distillation_logits) / 2`. The
outputs also hold each head's logits and `token_cosine_similarity`, the cosine of the two output tokens (the paper
reports 0.06 at the input and 0.93 at the last layer: close, not identical)."""

_ONE_HEAD = """## Without a distillation token

This is the paper's DeiT without a distillation token: the sequence is `[cls, patches]` and one linear head reads the
output class token. Trained with a teacher, that head learns the labels and the teacher's predictions at once (the
paper's "usual distillation", Table 3): `(1 - α) CE(logits, labels) + α KD(logits, teacher)`."""

# The 384 card: the paper's path from the 224 weights, which deit-hf can follow (the authors' own fine-tuned weights
# are what the card describes).
_UPSAMPLED_PATH = (
    "\n\nThe paper's path to this model from the 224 px weights: `deit-hf-convert --timm-model "
    "deit_base_distilled_patch16_224 --pretrained --image-size 384 --output deit-b-224-at-384` (the position "
    "embedding resampled bicubically as timm does), then 30 epochs of fine-tuning at 384 with the teacher at 384: "
    "`python -m training.train training/configs/finetune_384.yaml --model_name_or_path deit-b-224-at-384 "
    "--dataset_name ILSVRC/imagenet-1k`."
)

_LIMITATIONS = """## Limitations

The classes, photos and biases of the training data; ImageNet-1k's 1000 classes for the paper's weights. The
distillation head inherits the teacher's errors. Position embeddings are learned for one resolution: other sizes
need `from_pretrained(..., image_size=N)` (resampled once as the weights load) or `interpolate_pos_encoding=True`
(at each call) and, for accuracy, fine-tuning at that size (`training.train --input_size N`)."""


def _usage(model_id: str, two_heads: bool = True) -> str:
    heads = f"""

Both heads, and the two tokens' cosine:

```python
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification

import deit_hf  # noqa: F401  (registration)

processor = AutoImageProcessor.from_pretrained("{model_id}")
model = AutoModelForImageClassification.from_pretrained("{model_id}").eval()
with torch.no_grad():
    outputs = model(**processor(Image.open("cat.jpg"), return_tensors="pt"))
print(model.config.id2label[outputs.logits.argmax(-1).item()])  # fused prediction
print(outputs.cls_logits.argmax(-1), outputs.distillation_logits.argmax(-1), outputs.token_cosine_similarity)
```""" if two_heads else ""
    return f"""## How to use

```python
import deit_hf  # registers deit-hf's config, models and image processors with transformers' Auto classes
from PIL import Image
from transformers import pipeline

classifier = pipeline("image-classification", model="{model_id}")
print(classifier(Image.open("cat.jpg"), top_k=3))
```{heads}

Without deit-hf installed, transformers runs the model code saved with the checkpoint:

```python
from transformers import pipeline

classifier = pipeline("image-classification", model="{model_id}", trust_remote_code=True)
```"""


def _training(facts: CardFacts) -> str:
    if facts.recipe is not None:
        intro, recipe = "This run's settings:", facts.recipe
    elif facts.paper_preset is not None:
        paper = PAPER_RESULTS[facts.paper_preset]
        epochs = f"{paper.epochs} at 224 px" + (", then fine-tuned at 384 px" if "384" in facts.paper_preset else "")
        intro, recipe = "The paper's recipe, which these weights were trained with:", {"epochs": epochs, **PAPER_RECIPE}
    else:
        intro, recipe = "Not recorded with these weights. For reference, the paper's recipe:", PAPER_RECIPE
    teacher = f"\n\nTeacher: {facts.teacher}." if facts.teacher else ""
    rows = "\n".join(f"| {name} | {value} |" for name, value in recipe.items())
    return f"## Training\n\n{intro}\n\n| | |\n|---|---|\n{rows}{teacher}"


_MEASURED = (("top1", "fused (cls + dist) / 2"), ("cls_top1", "class head"), ("dist_top1", "distillation head"),
             ("teacher_top1", "teacher"), ("dist_teacher_agreement", "distillation head = teacher"),
             ("token_cosine", "cos(cls token, dist token)"))


def _evaluation(facts: CardFacts, two_heads: bool = True) -> str:
    paper_rows = "\n".join(
        f"| {result.display_name} | {result.top1} | {result.epochs} |" for result in PAPER_RESULTS.values()
    )
    paper = (
        "The paper's ImageNet-1k validation top-1, for the authors' weights; these are the authors' figures "
        f"([{PAPER}]({PAPER_URL})), not measurements by deit-hf:\n\n"
        f"| model | top-1 (%) | epochs |\n|---|---|---|\n{paper_rows}"
    )
    if facts.evaluation is None:
        measured = (
            "deit-hf has reproduced none of these on ImageNet yet: it has not measured this checkpoint's accuracy. "
            "The conversion is checked against timm's logits, not against ImageNet labels."
        )
    else:
        # a one-head model's `top1` is its class head's, already the "class head" row
        measured_rows = _MEASURED if two_heads else _MEASURED[1:]
        rows = "\n".join(
            f"| {label} | {facts.evaluation['eval_' + key]:.4f} |"
            for key, label in measured_rows if "eval_" + key in facts.evaluation
        )
        carried = "the fused top-1" if two_heads else "the class head's top-1"
        measured = (
            f"Measured by this run on {facts.evaluated_on or 'the validation split of ' + facts.dataset} (fractions "
            "of 1; `model-index` carries "
            f"{carried} in %):\n\n| | |\n|---|---|\n{rows}\n\n"
            "deit-hf has reproduced none of the paper's numbers on ImageNet yet."
        )
    return f"## Evaluation\n\n{measured}\n\n{paper}"


def main(argv: list[str] | None = None) -> int:
    """Write (or with `--check`, compare) `model_cards/<preset>/README.md` for every preset."""
    parser = argparse.ArgumentParser(prog="python -m deit_hf.modelcard", description=__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, default=CARDS_DIR, help="Folder of the cards (default: %(default)s).")
    parser.add_argument("--check", action="store_true", help="Write nothing; exit 1 if a card is missing or stale.")
    args = parser.parse_args(argv)
    stale = []
    for preset in PRESETS:
        path, card = args.output / preset / "README.md", preset_card(preset)
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != card:
                stale.append(str(path))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(card, encoding="utf-8")
    if stale:
        print("Stale model cards (regenerate with `python -m deit_hf.modelcard`): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
