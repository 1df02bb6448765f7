import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from umlcore.config import UMLConfig
from umlcore.losses import uml_loss
from umlcore.network import UMLNet, UMLOutput


@pytest.mark.parametrize("preset", ["small", "paper"])
def test_output_shapes(preset):
    cfg = UMLConfig.preset(preset, num_classes=3, num_seg_labels=4)
    net = UMLNet(cfg).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 3, 32, 48))
    assert isinstance(out, UMLOutput)
    assert out.seg_alpha.shape == (2, 4, 32, 48)
    assert out.mutual_alpha.shape == (2, 4, 32, 48)
    assert [tuple(t.shape) for t in out.deep_logits] == [(2, 4, 16, 24), (2, 4, 8, 12), (2, 4, 4, 6)]
    assert out.cls_alpha.shape == (2, 3)
    assert torch.all(out.seg_alpha >= 1) and torch.all(out.cls_alpha >= 1)


@pytest.mark.parametrize("hw", [(8, 8), (24, 40), (64, 16)])
def test_any_multiple_of_eight_works(hw):
    net = UMLNet(UMLConfig()).eval()
    with torch.no_grad():
        assert net(torch.randn(1, 3, *hw)).seg_alpha.shape[-2:] == hw


def test_bad_input_shapes_are_refused():
    net = UMLNet(UMLConfig())
    with pytest.raises(ValueError, match="multiples of 8"):
        net(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match="expects 3 input channels, got 1"):
        net(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r"expects \(B, C, H, W\)"):
        net(torch.randn(3, 32, 32))


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    net = UMLNet(UMLConfig()).train()
    x = torch.randn(2, 3, 32, 32)
    out = net(x)
    seg = torch.zeros(2, 32, 32, dtype=torch.long)
    seg[:, 8:20, 8:20] = 1
    loss = uml_loss(out, torch.tensor([0, 1]), seg, kl_weight=0.5)["total"]
    loss.backward()
    # the channel query's bias shifts every logit of a softmax over space alike, so its gradient is zero in exact
    # arithmetic (whatever rounding leaves of it depends on the machine's threads): checked as such, not as missing
    shift_invariant = {n for n, _ in net.named_parameters() if n.endswith("attn.ch_q.bias")}
    assert shift_invariant
    params = dict(net.named_parameters())
    assert all(params[n].grad.abs().max() < 1e-6 for n in shift_invariant)
    missing = [n for n, p in params.items()
               if n not in shift_invariant and (p.grad is None or not torch.any(p.grad != 0))]
    assert not missing, missing


def test_forward_features_then_head_equals_forward():
    net = UMLNet(UMLConfig()).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        a = net(x)
        b = net.forward_head(net.forward_features(x))
    assert torch.equal(a.seg_alpha, b.seg_alpha) and torch.equal(a.cls_alpha, b.cls_alpha)


def test_small_preset_costs_at_most_3_gflop_per_256_slice():
    net = UMLNet(UMLConfig.preset("small")).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(torch.randn(1, 3, 256, 256))
    assert counter.get_total_flops() <= 3e9


def test_medium_preset_is_four_times_small_within_the_bundle_limit():
    small, medium = UMLNet(UMLConfig.preset("small")).eval(), UMLNet(UMLConfig.preset("medium")).eval()
    n_small, n_medium = (sum(p.numel() for p in m.parameters()) for m in (small, medium))
    assert 3.5 < n_medium / n_small < 4.5 and n_medium * 4 < 25e6 / 3  # fp32 weights far under the 25 MB limit
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        medium(torch.randn(1, 3, 256, 256))
    assert counter.get_total_flops() <= 11e9
    assert medium.config.cls_pool == "avg+max+lesion"


def test_avg_max_pool_sees_a_small_local_feature_that_the_average_dilutes():
    from umlcore.network import UncertaintyInstructor

    torch.manual_seed(0)
    heads = {pool: UncertaintyInstructor(4, 4, 4, 8, 2, 0.0, pool=pool).eval() for pool in ("avg", "avg+max")}
    assert heads["avg+max"].fc.in_features == 2 * heads["avg"].fc.in_features == 16
    f = torch.zeros(1, 4, 32, 32)
    spot = f.clone()
    spot[..., 5, 7] = 10.0  # one cell of 1,024
    nav = torch.zeros(1, 4, 64, 64)
    with torch.no_grad():
        for pool, head in heads.items():
            head.fc.weight.fill_(1.0)
            head.fc.bias.zero_()
            change = (head(spot, spot, nav) - head(f, f, nav)).abs().max().item()
            assert (change > 1.0) == (pool == "avg+max"), (pool, change)


def test_lesion_pool_reads_the_features_under_the_segmented_foreground():
    from umlcore.network import LESION_POOL_EPS, UncertaintyInstructor

    torch.manual_seed(0)
    head = UncertaintyInstructor(4, 4, 4, 8, 2, 0.0, pool="avg+max+lesion").eval()
    assert head.fc.in_features == 24
    f = torch.randn(1, 4, 8, 8)
    nav = torch.zeros(1, 4, 64, 64)
    here, there = torch.zeros(1, 1, 64, 64), torch.zeros(1, 1, 64, 64)
    here[..., :8, :8] = 1.0  # exactly H/8 cell (0, 0)
    there[..., 56:, 56:] = 1.0  # cell (7, 7)
    with torch.no_grad():
        head.fc.weight.zero_()
        head.fc.weight[0, 16:] = 1.0  # logit 0 = sum of the lesion-pooled features only
        head.fc.bias.zero_()
        feats = head.feat(torch.cat([f, f], dim=1))
        feats = feats + feats * head.eta(torch.nn.functional.adaptive_avg_pool2d(nav, (8, 8)))
        expected = feats[..., 0, 0].sum() / (1.0 + LESION_POOL_EPS)
        assert head(f, f, nav, here)[0, 0].item() == pytest.approx(expected.item(), rel=1e-5)
        assert head(f, f, nav, there)[0, 0].item() == pytest.approx((feats[..., 7, 7].sum() / (1 + LESION_POOL_EPS)).item(), rel=1e-5)
        assert head(f, f, nav, torch.zeros_like(here))[0, 0].item() == 0.0  # nothing segmented: the pool is 0
    with pytest.raises(ValueError, match="foreground"):
        head(f, f, nav)


def test_lesion_pool_network_runs_and_its_gate_does_not_train_the_segmentation():
    cfg = UMLConfig.preset("small", cls_pool="avg+max+lesion")
    net = UMLNet(cfg).train()
    out = net(torch.randn(2, 3, 32, 32))
    assert out.cls_alpha.shape == (2, 2)
    out.cls_alpha.sum().backward()
    # the segmentation's last layer feeds the class output only through the (detached) gate: no gradient
    assert net.navigator.head.weight.grad is None
    assert net.instructor.fc.weight.grad is not None


def test_lesion_pool_is_finite_and_close_to_float32_under_autocast():
    torch.manual_seed(1)
    net = UMLNet(UMLConfig.preset("small", cls_pool="avg+max+lesion")).eval()
    x = torch.randn(2, 3, 64, 64) * 50.0  # large features: the weighted sum must not overflow
    with torch.no_grad():
        ref = net(x).cls_alpha
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = net(x).cls_alpha
    assert torch.isfinite(low).all()
    assert torch.allclose(low.float(), ref, rtol=0.05)
