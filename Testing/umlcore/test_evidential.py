import math

import torch

from umlcore.evidential import alpha_from_logits, opinion, probability, uncertainty


def test_uniform_evidence_gives_full_uncertainty():
    alpha = torch.ones(3, 4, 5, 5)  # zero evidence
    op = opinion(alpha)
    assert torch.allclose(op.uncertainty, torch.ones(3, 1, 5, 5))
    assert torch.allclose(op.belief, torch.zeros_like(alpha))
    assert torch.allclose(op.probability, torch.full_like(alpha, 0.25))


def test_belief_plus_uncertainty_is_one_everywhere():
    torch.manual_seed(0)
    alpha = alpha_from_logits(torch.randn(2, 3, 7, 9) * 5)
    op = opinion(alpha)
    total = op.belief.sum(1, keepdim=True) + op.uncertainty
    assert torch.allclose(total, torch.ones_like(total), atol=1e-6)
    assert torch.allclose(probability(alpha).sum(1), torch.ones(2, 7, 9), atol=1e-6)


def test_known_values():
    alpha = torch.tensor([[9.0, 1.0]])  # evidence (8, 0), S = 10
    op = opinion(alpha)
    assert torch.allclose(op.belief, torch.tensor([[0.8, 0.0]]))
    assert torch.allclose(op.uncertainty, torch.tensor([[0.2]]))
    assert torch.allclose(op.probability, torch.tensor([[0.9, 0.1]]))
    assert torch.allclose(uncertainty(alpha), torch.tensor([0.2]))


def test_alpha_from_logits_is_at_least_one():
    a = alpha_from_logits(torch.tensor([-100.0, 0.0, 100.0]))
    assert torch.all(a >= 1.0)
    assert torch.isclose(a[1], torch.tensor(1.0 + math.log(2.0)))
