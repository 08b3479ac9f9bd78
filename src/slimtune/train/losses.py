"""Losses: softmax cross-entropy (slim's, with label smoothing and the 0.4 aux head) and sigmoid
cross-entropy for multi-label targets that may hold -1 (ignore) entries."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

AUX_LOSS_WEIGHT = 0.4


def softmax_loss(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0,
                 aux_logits: Optional[Tensor] = None) -> Tensor:
    """Mean softmax cross-entropy; an auxiliary head adds 0.4 x its own loss, as slim does."""
    loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    if aux_logits is not None:
        loss = loss + AUX_LOSS_WEIGHT * F.cross_entropy(aux_logits, labels, label_smoothing=label_smoothing)
    return loss


def sigmoid_loss(logits: Tensor, targets: Tensor, pos_weight: Optional[Tensor] = None,
                 aux_logits: Optional[Tensor] = None) -> Tensor:
    """Sigmoid cross-entropy averaged over the labelled (non -1) entries."""
    def one(head: Tensor) -> Tensor:
        mask = (targets >= 0).to(head.dtype)
        per_entry = F.binary_cross_entropy_with_logits(head, targets.clamp(min=0), reduction="none",
                                                       pos_weight=pos_weight)
        return (per_entry * mask).sum() / mask.sum().clamp(min=1)

    loss = one(logits)
    if aux_logits is not None:
        loss = loss + AUX_LOSS_WEIGHT * one(aux_logits)
    return loss


def batch_accuracy(logits: Tensor, targets: Tensor, multi_label: bool) -> Tensor:
    """Top-1 accuracy, or for multi-label the fraction of labelled entries right at 0.5."""
    with torch.no_grad():
        if multi_label:
            mask = targets >= 0
            correct = ((logits > 0) == (targets > 0.5)) & mask
            return correct.sum().float() / mask.sum().clamp(min=1)
        return (logits.argmax(dim=-1) == targets).float().mean()
