"""Segmentation metrics: small pure functions over batches of binary masks.

``dice`` (dice.py), ``hd95`` / ``hd`` / ``nsd`` (surface.py) and multimask selection and
scoring (select.py). Each metric takes ``B x [1 x] H x W`` (or ``B x [1 x] D x H x W``) numpy
arrays or torch tensors and returns a float64 numpy array ``B``; each has a documented
``empty=`` policy. The evaluation uses ``empty="published"`` (see surface.py).
"""
from .dice import count_true, dice, dice_from_counts, overlap_counts
from .select import (
    LABEL_FREE_MODES,
    SELECTION_MODES,
    agreement_scores,
    binarize,
    choose,
    dice_per_mask,
    output_scores,
    score_multimask,
    select_masks,
    stability_scores,
)
from .surface import EdgeDistances, edge_distances, hausdorff_distance, hd, hd95, mask_edges, nsd

__all__ = [
    "LABEL_FREE_MODES",
    "SELECTION_MODES",
    "agreement_scores",
    "choose",
    "output_scores",
    "stability_scores",
    "EdgeDistances",
    "binarize",
    "count_true",
    "dice",
    "dice_from_counts",
    "dice_per_mask",
    "edge_distances",
    "hausdorff_distance",
    "hd",
    "hd95",
    "mask_edges",
    "nsd",
    "overlap_counts",
    "score_multimask",
    "select_masks",
]
