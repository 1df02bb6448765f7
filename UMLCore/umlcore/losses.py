"""Evidential losses of UML, as small pure functions.

All losses are computed per sample and averaged over the batch. Targets are class indices, never
one-hot tensors of ambiguous shape: a classification target must be ``(B,)`` and a segmentation
target ``(B, H, W)``; anything else is refused with a message (the original code silently
broadcast ``(B, 1)`` labels).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from .evidential import alpha_from_logits
from .network import UMLOutput

__all__ = [
    "kl_dirichlet_uniform",
    "evidential_nll",
    "evidential_loss",
    "evidential_classification_loss",
    "log_dice_loss",
    "evidential_segmentation_loss",
    "kl_annealing",
    "LossWeights",
    "uml_loss",
]


def kl_dirichlet_uniform(alpha: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """``KL(Dir(alpha) || Dir(1))`` along ``dim`` (that dimension is removed).

    ``lgamma(S) - lgamma(K) - sum lgamma(alpha_k) + sum (alpha_k - 1)(digamma(alpha_k) - digamma(S))``.
    """
    k = alpha.shape[dim]
    strength = alpha.sum(dim=dim, keepdim=True)
    term = (
        torch.lgamma(strength.squeeze(dim))
        - torch.lgamma(alpha.new_tensor(float(k)))
        - torch.lgamma(alpha).sum(dim=dim)
        + ((alpha - 1.0) * (torch.digamma(alpha) - torch.digamma(strength))).sum(dim=dim)
    )
    return term


def evidential_nll(alpha: torch.Tensor, target_onehot: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Expected cross-entropy under the Dirichlet: ``sum_k y_k (digamma(S) - digamma(alpha_k))``."""
    strength = alpha.sum(dim=dim, keepdim=True)
    return (target_onehot * (torch.digamma(strength) - torch.digamma(alpha))).sum(dim=dim)


def evidential_loss(alpha: torch.Tensor, target_onehot: torch.Tensor, kl_weight: float, dim: int = 1) -> torch.Tensor:
    """Digamma loss plus ``kl_weight * KL(Dir(alpha~) || Dir(1))``, ``alpha~ = y + (1 - y) alpha``.

    Returns the element-wise loss with ``dim`` removed (no reduction).
    """
    loss = evidential_nll(alpha, target_onehot, dim)
    if kl_weight > 0:
        alpha_tilde = target_onehot + (1.0 - target_onehot) * alpha
        loss = loss + kl_weight * kl_dirichlet_uniform(alpha_tilde, dim)
    return loss


def _check_cls_target(alpha: torch.Tensor, target: torch.Tensor) -> None:
    if alpha.ndim != 2:
        raise ValueError(f"classification alpha must be (B, K), got {tuple(alpha.shape)}")
    if target.ndim != 1 or target.shape[0] != alpha.shape[0]:
        raise ValueError(
            f"classification target must be class indices of shape (B,) = ({alpha.shape[0]},), got {tuple(target.shape)}; "
            "squeeze a (B, 1) label tensor with target.view(-1)"
        )
    if target.dtype.is_floating_point:
        raise ValueError("classification target must hold integer class indices, got a floating-point tensor")
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= alpha.shape[1]):
        raise ValueError(f"classification target values must lie in [0, {alpha.shape[1] - 1}]")


def evidential_classification_loss(alpha: torch.Tensor, target: torch.Tensor, kl_weight: float) -> torch.Tensor:
    """Mean over the batch of the evidential loss of image-level opinions.

    Args:
        alpha: ``(B, K)`` Dirichlet parameters.
        target: ``(B,)`` integer class indices.
        kl_weight: Annealed KL weight ``lambda_t`` (see :func:`kl_annealing`).
    """
    _check_cls_target(alpha, target)
    onehot = F.one_hot(target.long(), alpha.shape[1]).to(alpha.dtype)
    return evidential_loss(alpha, onehot, kl_weight).mean()


def _seg_onehot(target: torch.Tensor, num_labels: int, size: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    onehot = F.one_hot(target.long(), num_labels).permute(0, 3, 1, 2).to(dtype)
    if tuple(onehot.shape[-2:]) != tuple(size):
        onehot = F.interpolate(onehot, size=size, mode="area")  # soft targets for coarse deep-supervision levels
    return onehot


def _check_seg_target(alpha: torch.Tensor, target: torch.Tensor) -> None:
    if alpha.ndim != 4:
        raise ValueError(f"segmentation alpha must be (B, K, H, W), got {tuple(alpha.shape)}")
    if target.ndim != 3 or target.shape[0] != alpha.shape[0]:
        raise ValueError(
            f"segmentation target must be label indices of shape (B, H, W), got {tuple(target.shape)}; "
            "squeeze a channel dimension with target[:, 0]"
        )
    if target.dtype.is_floating_point:
        raise ValueError("segmentation target must hold integer labels, got a floating-point tensor")
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= alpha.shape[1]):
        raise ValueError(f"segmentation target values must lie in [0, {alpha.shape[1] - 1}]")


DiceMode = Literal["batch", "sample"]


def log_dice_loss(prob: torch.Tensor, target_onehot: torch.Tensor, eps: float = 1.0,
                  mode: DiceMode = "batch") -> torch.Tensor:
    """Log-Dice ``mean_c(-log((2 sum p g + eps) / (sum p + sum g + eps)))`` on probabilities.

    The mean runs over the classes present in the target. ``mode="batch"`` sums over the whole batch (nnU-Net's
    batch Dice): false positives on lesion-free crops then enter the denominator of the lesion Dice instead of
    making an ill-defined per-sample term. ``mode="sample"`` computes one Dice per sample (classes absent from a
    sample are left out: their term ``-log(eps / (sum p + eps))`` never vanishes, because an evidential pixel
    keeps the prior mass ``p_c >= 1 / S``).

    Args:
        prob: ``(B, K, H, W)`` expected probabilities (not alpha).
        target_onehot: ``(B, K, H, W)`` one-hot (or soft) targets.
        eps: Smoothing.
        mode: ``"batch"`` (default) or ``"sample"``.

    Returns:
        ``(B,)`` losses (the batch value repeated for ``mode="batch"``).
    """
    if mode not in ("batch", "sample"):
        raise ValueError(f"mode must be 'batch' or 'sample', got {mode!r}")
    dims = (0, 2, 3) if mode == "batch" else (2, 3)
    inter = (prob * target_onehot).sum(dims)
    target_sum = target_onehot.sum(dims)
    dice = (2.0 * inter + eps) / (prob.sum(dims) + target_sum + eps)
    present = target_sum > 0
    terms = torch.where(present, -torch.log(dice.clamp_min(1e-12)), torch.zeros_like(dice))
    loss = terms.sum(dim=-1) / present.sum(dim=-1).clamp_min(1).to(prob.dtype)
    return loss.expand(prob.shape[0]) if mode == "batch" else loss


def evidential_segmentation_loss(alpha: torch.Tensor, target: torch.Tensor, kl_weight: float,
                                 dice_mode: DiceMode = "batch") -> torch.Tensor:
    """Per-pixel evidential loss (mean over pixels, then samples) plus log-Dice on ``p = alpha / S``.

    Args:
        alpha: ``(B, K, h, w)`` Dirichlet parameters; ``(h, w)`` may be coarser than the target.
        target: ``(B, H, W)`` integer labels; area-downsampled to ``(h, w)`` when needed.
        kl_weight: Annealed KL weight.
        dice_mode: See :func:`log_dice_loss`.
    """
    _check_seg_target(alpha, target)
    onehot = _seg_onehot(target, alpha.shape[1], tuple(alpha.shape[-2:]), alpha.dtype)
    pixel = evidential_loss(alpha, onehot, kl_weight).flatten(1).mean(1)
    prob = alpha / alpha.sum(dim=1, keepdim=True)
    return (pixel + log_dice_loss(prob, onehot, mode=dice_mode)).mean()


def kl_annealing(epoch: float, anneal_epochs: float) -> float:
    """``lambda_t = min(1, epoch / anneal_epochs)`` (the paper anneals over 50 epochs)."""
    if anneal_epochs <= 0:
        return 1.0
    return float(min(1.0, max(0.0, epoch) / anneal_epochs))


@dataclass(frozen=True)
class LossWeights:
    """Weights of the total loss (paper: 0.5 / 0.4 / 0.1) and of deep supervision.

    ``L_seg = (L_final + sum_i w_i L_ds_i) / (1 + sum_i w_i)`` with ``w_i = deep_supervision_decay ** (i + 1)``,
    ``i = 0`` being the finest deep-supervision output.
    """

    classification: float = 0.5
    segmentation: float = 0.4
    mutual: float = 0.1
    deep_supervision_decay: float = 0.5


def uml_loss(
    out: UMLOutput,
    cls_target: torch.Tensor,
    seg_target: torch.Tensor,
    kl_weight: float,
    weights: LossWeights = LossWeights(),
    dice_mode: DiceMode = "batch",
) -> dict[str, torch.Tensor]:
    """Total UML loss ``w_c L_cls + w_s L_seg(final + deep supervision) + w_m L_mutual``.

    Args:
        out: Network output.
        cls_target: ``(B,)`` class indices.
        seg_target: ``(B, H, W)`` labels.
        kl_weight: Annealed KL weight (:func:`kl_annealing`).
        weights: :class:`LossWeights`.
        dice_mode: The segmentation terms' log-Dice, see :func:`log_dice_loss`.

    Returns:
        ``{"total", "cls", "seg", "mutual"}`` scalar tensors.
    """
    l_cls = evidential_classification_loss(out.cls_alpha, cls_target, kl_weight)
    l_final = evidential_segmentation_loss(out.seg_alpha, seg_target, kl_weight, dice_mode)
    num, den = l_final, 1.0
    for i, logits in enumerate(out.deep_logits):
        w = weights.deep_supervision_decay ** (i + 1)
        num = num + w * evidential_segmentation_loss(alpha_from_logits(logits), seg_target, kl_weight, dice_mode)
        den += w
    l_seg = num / den
    l_mut = evidential_segmentation_loss(out.mutual_alpha, seg_target, kl_weight, dice_mode)
    total = weights.classification * l_cls + weights.segmentation * l_seg + weights.mutual * l_mut
    return {"total": total, "cls": l_cls.detach(), "seg": l_seg.detach(), "mutual": l_mut.detach()}
