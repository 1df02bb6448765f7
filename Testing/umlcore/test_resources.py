"""umlcore.resources: a prediction's memory, estimated from the card and the slices before any voxel is read."""

import pytest

from umlcore.config import UMLConfig
from umlcore.errors import UMLInputError
from umlcore.resources import (BYTES_PER_PIXEL_AND_WIDTH, available_memory_bytes, estimate_bytes, memory_limit_bytes,
                               plan_batch)


def test_the_estimate_grows_with_the_slices_the_batch_and_the_network_width(card_factory):
    small, medium = card_factory(UMLConfig.preset("small")), card_factory(UMLConfig.preset("medium"))
    one = estimate_bytes(small, 10, (256, 256), 1)
    assert one >= 256 * 256 * 24 * BYTES_PER_PIXEL_AND_WIDTH  # the network's activations of one slice
    assert estimate_bytes(small, 10, (256, 256), 4) > one and estimate_bytes(small, 20, (256, 256), 1) > one
    assert estimate_bytes(medium, 10, (256, 256), 1) > one
    # a 4096 x 4096 slice of the small preset: about 12 GB at batch 1
    assert 10 < estimate_bytes(small, 2, (4096, 4096), 1) / 2**30 < 14


def test_the_plan_takes_the_largest_batch_that_fits_or_refuses(card_factory):
    card = card_factory(UMLConfig.preset("small"))
    per_slice = estimate_bytes(card, 1, (512, 512), 1)
    assert plan_batch(card, 1, (512, 512), 8, 100 * per_slice, "x") == 8
    assert plan_batch(card, 1, (512, 512), 8, int(2.5 * per_slice), "x") == 2
    with pytest.raises(UMLInputError, match="a 512x512x1 volume needs about .* --max-memory-gb"):
        plan_batch(card, 1, (512, 512), 8, per_slice // 2, "512x512x1")


def test_the_limit_is_a_share_of_what_is_available_or_the_given_gb():
    assert memory_limit_bytes(2.0) == 2 << 30
    assert 0 < memory_limit_bytes() <= available_memory_bytes()
    for bad in (0, -1.0):
        with pytest.raises(UMLInputError, match="positive number of GB"):
            memory_limit_bytes(bad)


def test_resized_slices_are_estimated_at_both_sizes(card_factory):
    """The network reads the card's target size; the arrays and the batch's input and outputs stay at the slices'."""
    from umlcore.resources import RESIZE_BYTES_PER_PIXEL_AND_CHANNEL

    card = card_factory(UMLConfig.preset("small"))
    native, small = estimate_bytes(card, 1, (2048, 2048), 2), estimate_bytes(card, 1, (64, 64), 2)
    resized = estimate_bytes(card, 1, (2048, 2048), 2, network_hw=(64, 64))
    assert small < resized < native
    arch = card.architecture
    assert resized - small >= 2048 * 2048 * 2 * (arch.in_channels + arch.num_seg_labels) * RESIZE_BYTES_PER_PIXEL_AND_CHANNEL
    assert estimate_bytes(card, 1, (64, 64), 2, network_hw=(64, 64)) == small
    assert plan_batch(card, 1, (2048, 2048), 8, 4 * resized, "x", network_hw=(64, 64)) == 8
