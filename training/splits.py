"""The synthetic data's splits: which generator seeds train, validate and test (defined here and nowhere else).

Seeds never overlap between splits. Every tool takes its cases from one split, optionally from a later first seed
(e.g. a fresh test set that no earlier measurement used: ``--first-seed 2008940``).
"""

from __future__ import annotations

from typing import Literal

__all__ = ["Split", "SPLIT_FIRST_SEED", "seeds"]

Split = Literal["train", "validation", "test"]

#: The first seed of each split; a split runs up to the next split's first seed.
SPLIT_FIRST_SEED: dict[str, int] = {"train": 0, "validation": 1_000_000, "test": 2_000_000}
_END = {"train": 1_000_000, "validation": 2_000_000, "test": 2**31 - 1}


def seeds(split: Split, count: int, first: int | None = None) -> range:
    """``count`` seeds of ``split`` from ``first`` (default: the split's first seed).

    Raises:
        ValueError: an unknown split, a negative count, or seeds that leave the split.
    """
    if split not in SPLIT_FIRST_SEED:
        raise ValueError(f"unknown split {split!r}: choose one of {list(SPLIT_FIRST_SEED)}")
    start = SPLIT_FIRST_SEED[split] if first is None else int(first)
    if count < 0 or start < SPLIT_FIRST_SEED[split] or start + count > _END[split]:
        raise ValueError(f"seeds {start}..{start + count - 1} leave the {split} split "
                         f"({SPLIT_FIRST_SEED[split]:,}..{_END[split] - 1:,}): choose another first seed or count")
    return range(start, start + count)
