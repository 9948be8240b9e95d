"""The eight LIDC-IDRI semantic ratings, their ranges, and the text that describes them.

Every LIDC reader (radiologist) rates each nodule they mark on eight semantic attributes; the nodule
store keeps the mean over readers (``attributes``, shape ``(N, 8)``, :data:`~cliplung.config.ATTRIBUTES`
order). The ranges below are those of the LIDC XML schema (and pylidc):

==================  =====  ===============================================================
attribute           range  meaning of the ends
==================  =====  ===============================================================
subtlety            1-5    1 extremely subtle ... 5 obvious
internalStructure   1-4    1 soft tissue, 2 fluid, 3 fat, 4 air
calcification       1-6    1 popcorn, 2 laminated, 3 solid, 4 non-central, 5 central, 6 absent
sphericity          1-5    1 linear ... 5 round
margin              1-5    1 poorly defined ... 5 sharp
lobulation          1-5    1 none ... 5 marked
spiculation         1-5    1 none ... 5 marked
texture             1-5    1 non-solid (ground glass) ... 5 solid
==================  =====  ===============================================================
"""

from __future__ import annotations

import torch

from cliplung.config import ATTRIBUTES

__all__ = [
    "ATTRIBUTE_PHRASES",
    "RATING_PROMPTS",
    "RATING_RANGES",
    "attribute_prompt",
    "rating_bounds",
    "rating_levels",
    "scale_ratings",
]

RATING_RANGES: dict[str, tuple[int, int]] = {
    "subtlety": (1, 5),
    "internalStructure": (1, 4),
    "calcification": (1, 6),
    "sphericity": (1, 5),
    "margin": (1, 5),
    "lobulation": (1, 5),
    "spiculation": (1, 5),
    "texture": (1, 5),
}
"""Inclusive (lowest, highest) rating of each attribute."""

ATTRIBUTE_PHRASES: dict[str, str] = {
    "subtlety": "subtlety",
    "internalStructure": "internal structure",
    "calcification": "calcification",
    "sphericity": "sphericity",
    "margin": "margin",
    "lobulation": "lobulation",
    "spiculation": "spiculation",
    "texture": "texture",
}
"""Words used by ``attribute_prompts: name`` ("the nodule is {phrase}."); pylidc's camel-case name is
split so the tokenizer sees English words."""

RATING_PROMPTS: dict[str, tuple[str, ...]] = {
    "subtlety": (
        "the nodule is extremely subtle.",
        "the nodule is moderately subtle.",
        "the nodule is fairly subtle.",
        "the nodule is moderately obvious.",
        "the nodule is obvious.",
    ),
    "internalStructure": (
        "the nodule has soft tissue internal structure.",
        "the nodule has fluid internal structure.",
        "the nodule has fat internal structure.",
        "the nodule has air internal structure.",
    ),
    "calcification": (
        "the nodule has popcorn calcification.",
        "the nodule has laminated calcification.",
        "the nodule has solid calcification.",
        "the nodule has non-central calcification.",
        "the nodule has central calcification.",
        "the nodule has no calcification.",
    ),
    "sphericity": (
        "the nodule is linear.",
        "the nodule is ovoid to linear.",
        "the nodule is ovoid.",
        "the nodule is ovoid to round.",
        "the nodule is round.",
    ),
    "margin": (
        "the nodule has a poorly defined margin.",
        "the nodule has a nearly poorly defined margin.",
        "the nodule has a medium margin.",
        "the nodule has a nearly sharp margin.",
        "the nodule has a sharp margin.",
    ),
    "lobulation": (
        "the nodule has no lobulation.",
        "the nodule has nearly no lobulation.",
        "the nodule has medium lobulation.",
        "the nodule has nearly marked lobulation.",
        "the nodule has marked lobulation.",
    ),
    "spiculation": (
        "the nodule has no spiculation.",
        "the nodule has nearly no spiculation.",
        "the nodule has medium spiculation.",
        "the nodule has nearly marked spiculation.",
        "the nodule has marked spiculation.",
    ),
    "texture": (
        "the nodule is non-solid ground glass.",
        "the nodule is non-solid and mixed.",
        "the nodule is part solid and mixed.",
        "the nodule is solid and mixed.",
        "the nodule is solid.",
    ),
}
"""Sentences used by ``attribute_prompts: rating``: entry ``r - low`` describes rating ``r``
(wording after the LIDC rating definitions)."""

assert tuple(RATING_RANGES) == ATTRIBUTES == tuple(RATING_PROMPTS) == tuple(ATTRIBUTE_PHRASES)
assert all(len(RATING_PROMPTS[a]) == hi - lo + 1 for a, (lo, hi) in RATING_RANGES.items())


def attribute_prompt(attribute: str) -> str:
    """The name prompt of one attribute (the context tokens come before it)."""
    return f"the nodule is {ATTRIBUTE_PHRASES[attribute]}."


def rating_bounds() -> torch.Tensor:
    """``(2, 8)`` float32: the lowest and highest rating of each attribute (:data:`RATING_RANGES`).

    A model keeps it as a buffer (:class:`~cliplung.model.CLIPLung` ``rating_bounds``), so it lives on
    the model's device: building it from Python numbers inside a GPU step would be a blocking
    host-to-device copy every call."""
    return torch.tensor([[RATING_RANGES[a][i] for a in ATTRIBUTES] for i in (0, 1)], dtype=torch.float32)


def _bounds(ratings: torch.Tensor, bounds: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if bounds is None:
        bounds = rating_bounds()
    bounds = bounds.to(device=ratings.device, dtype=ratings.dtype)
    return bounds[0], bounds[1]


def scale_ratings(ratings: torch.Tensor, bounds: torch.Tensor | None = None) -> torch.Tensor:
    """Mean reader ratings ``(B, 8)`` → ``[0, 1]``, each attribute by its own LIDC range.

    ``r̃_k = (clip(r_k, lo_k, hi_k) − lo_k) / (hi_k − lo_k)``; a missing rating (NaN) counts as the
    low end (``r̃ = 0``). This is the one place the rating ranges enter the model: the attribute
    weights of the contrastive losses are ``w = softmax(r̃)``. ``bounds``: :func:`rating_bounds`,
    ideally already on the ratings' device.
    """
    if ratings.shape[-1] != len(ATTRIBUTES):
        raise ValueError(
            f"attributes: expected (..., {len(ATTRIBUTES)}) mean ratings, got {tuple(ratings.shape)}"
        )
    ratings = ratings if ratings.dtype == torch.float64 else ratings.float()
    lo, hi = _bounds(ratings, bounds)
    ratings = torch.where(torch.isnan(ratings), lo, ratings)
    return (torch.minimum(torch.maximum(ratings, lo), hi) - lo) / (hi - lo)


def rating_levels(ratings: torch.Tensor, bounds: torch.Tensor | None = None) -> torch.Tensor:
    """Index into :data:`RATING_PROMPTS` of each mean rating: ``round(clip(r)) − low`` (long)."""
    ratings = ratings if ratings.dtype == torch.float64 else ratings.float()
    lo, hi = _bounds(ratings, bounds)
    ratings = torch.where(torch.isnan(ratings), lo, ratings)
    return (torch.round(torch.minimum(torch.maximum(ratings, lo), hi)) - lo).long()
