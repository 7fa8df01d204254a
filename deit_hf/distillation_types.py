"""The distillation types: what the distillation head (or the class head of a model without one) learns from.

The names and what each implies live here only: the config, the loss, the argument checks, the teacher's targets and
the run card ask `distillation_type(name)` for the property they depend on. How each type computes its loss is
`deit_hf.losses.DistillationLoss`'s.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class DistillationType:
    """One value of `DeiTConfig.distillation_type` and `--distillation_type`."""

    name: str
    description: str
    uses_teacher: bool  # the loss reads the teacher's logits: a teacher, or its recorded targets, is needed
    uses_teacher_distribution: bool = False  # all the teacher's logits, not its argmax (temperature, top-k records)
    weighs_two_parts: bool = True  # the loss weighs its two parts by `distillation_alpha`
    needs_distillation_token: bool = False  # the type has no meaning on a model with one head


DISTILLATION_TYPES = {
    kind.name: kind
    for kind in (
        DistillationType("hard", "the teacher's argmax", uses_teacher=True),
        DistillationType("soft", "KL to the teacher at temperature tau", uses_teacher=True,
                         uses_teacher_distribution=True),
        DistillationType("none", "no teacher, both heads learn the labels through the fused logits", uses_teacher=False,
                         weighs_two_parts=False),
        DistillationType("labels", "no teacher, each head learns the labels (two class tokens)", uses_teacher=False,
                         needs_distillation_token=True),
    )
}


def get_distillation_type(name: str) -> DistillationType:
    """The type named `name`; `ValueError` naming the types for any other."""
    try:
        return DISTILLATION_TYPES[name]
    except (KeyError, TypeError):
        raise ValueError(f"`distillation_type` must be one of {tuple(DISTILLATION_TYPES)}, got {name!r}.") from None


TEACHER_TYPES = tuple(name for name, kind in DISTILLATION_TYPES.items() if kind.uses_teacher)  # for messages
