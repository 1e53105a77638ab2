"""Perceiver-reward penalties of PRA-GRPO (p2r-method.md §Rewards).

A perceiver rollout earns 0 before the reasoner is ever called when two of its boxes overlap
with IoU > 0.5, or when a box has no label or copies the prompt's placeholder label. Otherwise
its reward is the graded answer of the frozen reasoner on the evidence it produced; that part
needs services and lives in the trainer, which imports the rule from here.
"""

from __future__ import annotations

from p2r.core.bbox import Region, iou
from p2r.core.prompts import LABEL_PLACEHOLDER

IOU_PENALTY_THRESHOLD = 0.5


def perceiver_penalty(regions: list[Region]) -> str | None:
    """Why these regions earn reward 0 regardless of the answer, or None if they don't.

    As the reference: a label that is missing (``None``: no key, or not a string - the
    reference crashes on those, the project penalises them), empty, or whose
    ``strip().lower()`` is the placeholder ``description`` is penalised; so ``" Description "``
    is, and a label of only spaces is not. An empty region list carries no penalty: it means
    "the whole image" and the reasoner answers without evidence.
    """
    placeholder = LABEL_PLACEHOLDER["train"]
    for i, region in enumerate(regions):
        if region.label is None or region.label == "":
            return f"bbox {i} has no label"
        if region.label.strip().lower() == placeholder:
            return f"bbox {i} label is the placeholder {region.label!r}"
    for i, a in enumerate(regions):
        for j in range(i + 1, len(regions)):
            overlap = iou(a, regions[j])
            if overlap > IOU_PENALTY_THRESHOLD:
                return f"bboxes {i} and {j} overlap with IoU {overlap:.2f} > {IOU_PENALTY_THRESHOLD}"
    return None
