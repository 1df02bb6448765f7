"""Subjective-logic statistics of Dirichlet opinions (evidential deep learning).

With ``K`` classes and non-negative evidence ``e``: ``alpha = e + 1``, strength ``S = sum_k alpha_k``,
belief ``b_k = e_k / S``, uncertainty ``u = K / S`` (so ``sum_k b_k + u = 1``) and expected
probability ``p_k = alpha_k / S``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["Opinion", "evidence_from_logits", "alpha_from_logits", "opinion", "uncertainty", "probability"]


class Opinion(NamedTuple):
    """A Dirichlet opinion; each field keeps the class dimension of ``alpha`` (``uncertainty`` has size 1 there)."""

    belief: torch.Tensor
    uncertainty: torch.Tensor
    probability: torch.Tensor
    strength: torch.Tensor


def evidence_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Non-negative evidence ``softplus(logits)``."""
    return F.softplus(logits)


def alpha_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Dirichlet parameters ``softplus(logits) + 1``."""
    return F.softplus(logits) + 1.0


def _check_alpha(alpha: torch.Tensor, dim: int) -> None:
    if alpha.ndim == 0:
        raise ValueError("alpha must have a class dimension, got a scalar")
    if alpha.shape[dim] < 2:
        raise ValueError(f"alpha needs >= 2 classes along dim {dim}, got shape {tuple(alpha.shape)}")


def opinion(alpha: torch.Tensor, dim: int = 1) -> Opinion:
    """Belief, uncertainty, expected probability and strength of Dirichlet ``alpha``.

    Args:
        alpha: Dirichlet parameters (>= 1), e.g. ``(B, K)`` or ``(B, K, H, W)``.
        dim: The class dimension.

    Returns:
        :class:`Opinion` with ``belief`` and ``probability`` shaped like ``alpha`` and
        ``uncertainty`` / ``strength`` with size 1 along ``dim``.
    """
    _check_alpha(alpha, dim)
    strength = alpha.sum(dim=dim, keepdim=True)
    k = alpha.shape[dim]
    return Opinion(
        belief=(alpha - 1.0) / strength,
        uncertainty=k / strength,
        probability=alpha / strength,
        strength=strength,
    )


def uncertainty(alpha: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """``u = K / S`` with the class dimension removed."""
    _check_alpha(alpha, dim)
    return alpha.shape[dim] / alpha.sum(dim=dim)


def probability(alpha: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Expected class probability ``alpha / S``."""
    _check_alpha(alpha, dim)
    return alpha / alpha.sum(dim=dim, keepdim=True)
