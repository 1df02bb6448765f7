"""training.slices: seeded batches, lesion oversampling, crops, phases kept in order, 2.5D context, noise."""

import numpy as np
import pytest
import torch

from training.slices import SliceSampler, VolumeCase, case_from_synthetic
from umlcore.card import Normalization
from umlcore.synthetic import generate_case


def test_slice_sampler_batches_are_seeded_and_oversample_lesions():

    cases = [case_from_synthetic(generate_case(s, shape=(8, 48, 48), lesion_prob=1.0), Normalization())
             for s in range(3)]
    batches = [SliceSampler(cases, crop=32, lesion_fraction=1.0, seed=4).batch(6) for _ in range(2)]
    x, seg, cls = batches[0]
    assert x.shape == (6, 3, 32, 32) and x.dtype == torch.float32
    assert seg.shape == (6, 32, 32) and seg.dtype == torch.int64 and cls.shape == (6,)
    assert all(torch.equal(a, b) for a, b in zip(*batches))  # same seed, same batch
    assert (seg.flatten(1).amax(1) > 0).float().mean() >= 0.5  # lesion slices, crops mostly keep the lesion
    with pytest.raises(ValueError, match="multiple of 8"):
        SliceSampler(cases, crop=30)


def test_slice_sampler_advance_slides_its_window_of_cases():

    def case(value: float, lesion_slice: int) -> VolumeCase:
        mask = np.zeros((4, 16, 16), np.uint8)
        mask[lesion_slice, 4:8, 4:8] = 1
        return VolumeCase(f"c{value}", np.full((3, 4, 16, 16), value, np.float32), np.zeros((0, 4, 16, 16), np.float32),
                          mask, 1, 1, (1.0, 1.0, 1.0))

    for mode in ("slice", "lesion"):
        sampler = SliceSampler([case(0, 0), case(1, 1), case(2, 2)], crop=16, seed=0, lesion_sampling=mode)
        sampler.advance([case(3, 3), case(4, 0)])
        assert [float(c[0, 0, 0, 0]) for c in sampler.channels] == [2, 3, 4]  # the two oldest gave way
        assert len(sampler.all_slices) == 12 and len(sampler.masks) == len(sampler.labels) == 3
        assert sampler.lesion_slices == [(0, 2), (1, 3), (2, 0)]  # the draw tables index the new window
        picks = {(i, z) for i, z, _ in (sampler._pick() for _ in range(300))}
        assert {(0, 2), (1, 3), (2, 0)} <= picks and all(i < 3 for i, _ in picks)
        with pytest.raises(ValueError, match="at most"):
            sampler.advance([case(5, 0)] * 4)


def test_slice_sampler_keeps_the_order_of_the_phases_and_replicated_volumes_identical():
    """The photometric augmentation must not scramble the kinetics (late vs early) the case label is read from."""

    levels = np.array([0.3, 0.5, 0.6], np.float32)  # pre < early < late (+20 %), like persistent enhancement
    channels = np.broadcast_to(levels[:, None, None, None], (3, 4, 32, 32)).copy()
    case = VolumeCase("flat", channels, channels[1:2].copy(), np.zeros((4, 32, 32), np.uint8), 0, 0, (1.0, 1.0, 1.0))
    x, _, _ = SliceSampler([case], crop=32, single_volume_prob=0.0, seed=1).batch(64)
    means = x.mean(dim=(2, 3))
    assert bool((means[:, 2] > means[:, 1]).all()) and bool((means[:, 1] > means[:, 0]).all())
    x, _, _ = SliceSampler([case], crop=32, single_volume_prob=1.0, seed=1).batch(16)
    spread = x.mean(dim=(2, 3)).amax(1) - x.mean(dim=(2, 3)).amin(1)
    assert float(spread.max()) < 0.02  # one volume replicated: the channels differ only by their pixel noise
    with pytest.raises(ValueError, match="channel_jitter"):
        SliceSampler([case], crop=32, channel_jitter=0.7)


def test_slice_sampler_lesion_sampling_draws_every_lesion_equally():
    """A lesion over 8 slices and one on the last of them: "slice" draws that slice 1 time in 8 (and centres the
    crop on any of its 404 lesion pixels), "lesion" draws the small lesion 1 time in 2, with its own pixels."""

    mask = np.zeros((10, 64, 64), np.uint8)
    mask[0:8, 30:50, 30:50] = 1  # large
    mask[7, 4:6, 4:6] = 1  # small, on the large one's last slice (not touching it)
    image = np.zeros((3, 10, 64, 64), np.float32)
    case = VolumeCase("two", image, image[1:2].copy(), mask, 1, 1, (1.0, 1.0, 1.0))
    sampler = SliceSampler([case], crop=16, lesion_fraction=1.0, seed=3, lesion_sampling="slice")
    picks = [sampler._pick() for _ in range(4000)]
    assert np.mean([z == 7 for _, z, _ in picks]) == pytest.approx(1 / 8, abs=0.03)
    assert {len(pixels) for _, z, pixels in picks if z == 7} == {404}
    sampler = SliceSampler([case], crop=16, lesion_fraction=1.0, seed=3, lesion_sampling="lesion")
    picks = [sampler._pick() for _ in range(4000)]
    small = [(z, len(pixels)) for _, z, pixels in picks if (pixels[:, 1] < 10).all()]
    assert len(small) / len(picks) == pytest.approx(1 / 2, abs=0.03)
    assert set(small) == {(7, 4)}  # the small lesion's own pixels, not the large one's
    with pytest.raises(ValueError, match="lesion_sampling must be 'slice' or 'lesion'"):
        SliceSampler([case], crop=16, lesion_sampling="component")


def test_slice_sampler_context_slices_follow_the_predictors_order_and_share_a_phases_scale():
    """2.5D samples: channel 3c + 1 + d is phase c of slice z + d (edges repeated), and the per-phase jitter is the
    same for a phase's three slices, so the slice-to-slice change of every phase is the same factor."""

    levels = np.array([0.3, 0.5, 0.6], np.float32)[:, None]
    ramp = 1.0 + 0.1 * np.arange(6, dtype=np.float32)[None, :]  # brighter with z
    channels = np.broadcast_to((levels * ramp)[:, :, None, None], (3, 6, 32, 32)).copy()
    case = VolumeCase("ramp", channels, channels[1:2].copy(), np.zeros((6, 32, 32), np.uint8), 0, 0, (1.0, 1.0, 3.0))
    x, _, _ = SliceSampler([case], crop=32, single_volume_prob=0.0, noise_max=0.0, seed=5, context_slices=1).batch(64)
    assert x.shape == (64, 9, 32, 32)
    m = x.mean(dim=(2, 3)).double().view(64, 3, 3)  # (sample, phase, slice z-1 / z / z+1)
    assert bool((m[:, :, 0] <= m[:, :, 1]).all()) and bool((m[:, :, 1] <= m[:, :, 2]).all())
    edges = (m[:, 0, 0] == m[:, 0, 1]) | (m[:, 0, 1] == m[:, 0, 2])
    assert 0 < int(edges.sum()) < 64  # first / last slices repeat themselves, inner ones do not
    ratio = m[:, :, 2] / m[:, :, 1]
    torch.testing.assert_close(ratio, ratio[:, :1].expand(-1, 3), rtol=1e-5, atol=0)
    assert bool((m[:, 2, 1] > m[:, 1, 1]).all())  # phases keep their order
    x, _, _ = SliceSampler([case], crop=32, single_volume_prob=1.0, noise_max=0.0, seed=5, context_slices=1).batch(8)
    m = x.mean(dim=(2, 3)).view(8, 3, 3)
    assert torch.equal(m[:, 0], m[:, 1]) and torch.equal(m[:, 0], m[:, 2])  # one volume: every phase the same
    with pytest.raises(ValueError, match="context_slices"):
        SliceSampler([case], crop=32, context_slices=9)


def test_slice_sampler_noise_level_is_drawn_up_to_noise_max():

    flat = np.full((3, 4, 32, 32), 0.5, np.float32)  # a flat image: the pixel spread is the added noise alone
    case = VolumeCase("flat", flat, flat[1:2].copy(), np.zeros((4, 32, 32), np.uint8), 0, 0, (1.0, 1.0, 1.0))
    for noise_max in (0.0, 0.03, 0.2):
        x, _, _ = SliceSampler([case], crop=32, seed=2, noise_max=noise_max).batch(64)
        sigma = x.std(dim=(2, 3))  # (64, 3): one sigma per sample, shared by its channels
        assert float(sigma.max()) <= noise_max * 1.05 + 1e-6
        assert float(sigma.max()) >= noise_max * 0.85  # 64 draws of U[0, noise_max] reach near the top
    with pytest.raises(ValueError, match="noise_max"):
        SliceSampler([case], crop=32, noise_max=1.5)
