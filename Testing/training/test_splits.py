"""training.splits: the seed ranges of the synthetic splits never overlap."""

import pytest

from training.splits import SPLIT_FIRST_SEED, seeds


def test_each_split_starts_at_its_first_seed_and_stays_inside():
    assert seeds("train", 3) == range(0, 3)
    assert seeds("validation", 2) == range(1_000_000, 1_000_002)
    assert seeds("test", 400, 2_008_940) == range(2_008_940, 2_009_340)
    assert sorted(SPLIT_FIRST_SEED.values()) == [0, 1_000_000, 2_000_000]
    for split, count, first in (("train", 2, 999_999), ("validation", 1, 999_999), ("test", 1, 1_999_999),
                                ("validation", -1, None)):
        with pytest.raises(ValueError, match="leave the"):
            seeds(split, count, first)
    with pytest.raises(ValueError, match="unknown split"):
        seeds("holdout", 1)
