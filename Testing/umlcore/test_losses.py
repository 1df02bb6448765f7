import math

import pytest
import torch

from umlcore.config import UMLConfig
from umlcore.losses import (
    evidential_classification_loss,
    evidential_nll,
    evidential_segmentation_loss,
    kl_annealing,
    kl_dirichlet_uniform,
    log_dice_loss,
    uml_loss,
)
from umlcore.network import UMLNet


def test_kl_is_zero_for_uniform_dirichlet():
    assert torch.allclose(kl_dirichlet_uniform(torch.ones(5, 3)), torch.zeros(5), atol=1e-6)


def test_kl_is_positive_otherwise_and_matches_closed_form():
    alpha = torch.tensor([[2.0, 1.0]])
    # KL(Dir(2,1) || Dir(1,1)) = lgamma(3) - lgamma(2) - lgamma(2) - lgamma(1) + (2-1)(digamma(2) - digamma(3))
    expected = math.lgamma(3) - math.lgamma(2) - math.lgamma(2) + (torch.digamma(torch.tensor(2.0)) - torch.digamma(torch.tensor(3.0))).item()
    assert kl_dirichlet_uniform(alpha).item() == pytest.approx(expected, abs=1e-6)
    assert expected > 0


def test_evidential_nll_known_value():
    alpha = torch.tensor([[3.0, 1.0]])
    y = torch.tensor([[1.0, 0.0]])
    expected = (torch.digamma(torch.tensor(4.0)) - torch.digamma(torch.tensor(3.0))).item()
    assert evidential_nll(alpha, y).item() == pytest.approx(expected, abs=1e-6)


def test_kl_term_vanishes_when_all_evidence_is_on_the_true_class():
    alpha = torch.tensor([[50.0, 1.0], [1.0, 7.0]])
    target = torch.tensor([0, 1])
    with_kl = evidential_classification_loss(alpha, target, kl_weight=1.0)
    without = evidential_classification_loss(alpha, target, kl_weight=0.0)
    assert with_kl.item() == pytest.approx(without.item(), abs=1e-6)


def test_classification_target_shape_b1_is_refused():
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        evidential_classification_loss(torch.ones(4, 2) * 2, torch.zeros(4, 1, dtype=torch.long), 1.0)
    with pytest.raises(ValueError, match="integer class indices"):
        evidential_classification_loss(torch.ones(4, 2) * 2, torch.zeros(4), 1.0)
    with pytest.raises(ValueError, match=r"lie in \[0, 1\]"):
        evidential_classification_loss(torch.ones(4, 2) * 2, torch.full((4,), 2), 1.0)


def test_segmentation_target_shape_is_checked():
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        evidential_segmentation_loss(torch.ones(2, 2, 8, 8), torch.zeros(2, 1, 8, 8, dtype=torch.long), 1.0)


def test_log_dice_perfect_and_known():
    g = torch.zeros(1, 2, 4, 4)
    g[:, 1, :2] = 1
    g[:, 0, 2:] = 1
    assert log_dice_loss(g, g, eps=0.0, mode="sample").item() == pytest.approx(0.0, abs=1e-6)
    p = torch.full_like(g, 0.5)
    # each class: 2*sum(0.5*g)/(sum(0.5)+sum(g)) = 8/(8+8) = 0.5 -> -log(0.5)
    assert log_dice_loss(p, g, eps=0.0, mode="sample").item() == pytest.approx(math.log(2), abs=1e-6)


def test_log_dice_leaves_out_classes_absent_from_the_target():
    g = torch.zeros(1, 2, 4, 4)
    g[:, 0] = 1  # background only: a lesion-free slice
    p = torch.full_like(g, 0.5)
    # only the background term: 2*8/(8+16) = 2/3
    assert log_dice_loss(p, g, eps=0.0, mode="sample").item() == pytest.approx(-math.log(2 / 3), abs=1e-6)


def test_batch_dice_counts_false_positives_on_lesion_free_samples():
    g = torch.zeros(2, 2, 4, 4)
    g[:, 0] = 1
    g[0, 1, :2] = 1  # sample 0 has a lesion in its top half, sample 1 none
    g[0, 0, :2] = 0
    perfect = g.clone()
    fp = g.clone()
    fp[1, 1, :2], fp[1, 0, :2] = 1, 0  # false-positive lesion on the lesion-free sample
    assert log_dice_loss(perfect, g, eps=0.0).tolist() == pytest.approx([0.0, 0.0], abs=1e-6)
    # lesion: 2*8/(16+8) = 2/3; background: 2*16/(16+24) = 0.8
    expected = (-math.log(2 / 3) - math.log(0.8)) / 2
    assert log_dice_loss(fp, g, eps=0.0).tolist() == pytest.approx([expected, expected], abs=1e-6)
    with pytest.raises(ValueError, match="mode must be"):
        log_dice_loss(fp, g, mode="pixel")


def test_log_dice_uses_probabilities_not_alpha():
    alpha = torch.ones(1, 2, 4, 4)
    alpha[:, 1, :2] = 101.0  # confident foreground in the top half
    alpha[:, 0, 2:] = 101.0  # confident background in the bottom half
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    target[:, :2] = 1
    loss = evidential_segmentation_loss(alpha, target, kl_weight=0.0)
    # on p the Dice is ~0.99 (loss ~0.02); on raw alpha it would exceed 1 and the log-Dice turn negative
    assert 0.0 < loss.item() < 0.05


def test_deep_supervision_targets_are_downsampled():
    alpha = torch.ones(2, 2, 4, 4) * 2
    target = torch.zeros(2, 16, 16, dtype=torch.long)
    assert torch.isfinite(evidential_segmentation_loss(alpha, target, 0.5))


def test_kl_annealing():
    assert kl_annealing(0, 50) == 0.0
    assert kl_annealing(25, 50) == 0.5
    assert kl_annealing(80, 50) == 1.0
    assert kl_annealing(3, 0) == 1.0


def test_loss_decreases_on_a_tiny_fixed_batch():
    torch.manual_seed(0)
    net = UMLNet(UMLConfig.preset("small", in_channels=1))
    x = torch.randn(4, 1, 32, 32)
    seg = (x[:, 0] > 0.5).long()
    cls = torch.tensor([0, 1, 0, 1])
    x[cls == 1] += 1.0
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        out = net(x)
        loss = uml_loss(out, cls, seg, kl_weight=0.1)["total"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_uml_loss_dice_mode_weighs_small_lesions_per_sample():
    torch.manual_seed(0)
    net = UMLNet(UMLConfig.preset("small", in_channels=1)).eval()
    x = torch.randn(2, 1, 32, 32)
    seg = torch.zeros(2, 32, 32, dtype=torch.long)
    seg[0, 4:24, 4:24] = 1  # a large lesion and a small one
    seg[1, 10:12, 10:12] = 1
    cls = torch.tensor([0, 1])
    with torch.no_grad():
        out = net(x)
        one = [uml_loss(out, cls, seg, kl_weight=0.1, dice_mode=m)["total"] for m in ("batch", "sample")]
        assert uml_loss(out, cls, seg, kl_weight=0.1)["total"] == one[0]  # batch is the default
        first = type(out)(*(o[:1] if torch.is_tensor(o) else tuple(t[:1] for t in o) for o in out))
        single = [uml_loss(first, cls[:1], seg[:1], 0.1, dice_mode=m)["total"] for m in ("batch", "sample")]
    assert single[0] == pytest.approx(single[1].item(), abs=1e-6)  # one sample: the two modes agree
    assert abs(one[0].item() - one[1].item()) > 1e-3  # two lesion sizes: they differ
