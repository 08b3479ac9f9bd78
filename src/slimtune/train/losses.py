"""Losses: softmax cross-entropy (slim's, with label smoothing and the 0.4 aux head) and sigmoid
cross-entropy for multi-label targets that may hold -1 (ignore) entries."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError

AUX_LOSS_WEIGHT = 0.4
#: The end point every net with an auxiliary classifier records it under (slim's name).
AUX_END_POINT = "AuxLogits"


def aux_logits_of(end_points: Any, weight: float = AUX_LOSS_WEIGHT) -> Optional[Tensor]:
    """The auxiliary head's logits [N, classes] from a net's end points, or None when the net has
    none or its weight is 0 (then the head costs no loss). Any net that records `AuxLogits`
    (Inception v3/v4, Inception-ResNet-v2, NASNet, a user's own) gets the aux loss this way."""
    if weight < 0:
        raise ConfigError(f"--aux_loss_weight must be >= 0 (0 disables the auxiliary loss), got {weight}")
    if not weight or not isinstance(end_points, Mapping):
        return None
    aux = end_points.get(AUX_END_POINT)
    if aux is None:
        return None
    return aux.flatten(1) if aux.dim() == 4 and aux.shape[2] == aux.shape[3] == 1 else aux


def softmax_loss(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0,
                 aux_logits: Optional[Tensor] = None, aux_weight: float = AUX_LOSS_WEIGHT) -> Tensor:
    """Mean softmax cross-entropy; an auxiliary head adds aux_weight (slim: 0.4) x its own loss,
    with the same label smoothing, as slim's train_image_classifier does."""
    loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    if aux_logits is not None and aux_weight:
        loss = loss + aux_weight * F.cross_entropy(aux_logits, labels, label_smoothing=label_smoothing)
    return loss


def sigmoid_loss(logits: Tensor, targets: Tensor, pos_weight: Optional[Tensor] = None,
                 aux_logits: Optional[Tensor] = None, aux_weight: float = AUX_LOSS_WEIGHT) -> Tensor:
    """Sigmoid cross-entropy averaged over the labelled (non -1) entries."""
    def one(head: Tensor) -> Tensor:
        mask = (targets >= 0).to(head.dtype)
        per_entry = F.binary_cross_entropy_with_logits(head, targets.clamp(min=0), reduction="none",
                                                       pos_weight=pos_weight)
        return (per_entry * mask).sum() / mask.sum().clamp(min=1)

    loss = one(logits)
    if aux_logits is not None and aux_weight:
        loss = loss + aux_weight * one(aux_logits)
    return loss


def batch_accuracy(logits: Tensor, targets: Tensor, multi_label: bool) -> Tensor:
    """Top-1 accuracy, or for multi-label the fraction of labelled entries right at 0.5."""
    with torch.no_grad():
        if multi_label:
            mask = targets >= 0
            correct = ((logits > 0) == (targets > 0.5)) & mask
            return correct.sum().float() / mask.sum().clamp(min=1)
        return (logits.argmax(dim=-1) == targets).float().mean()
