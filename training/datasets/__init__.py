"""Dataset adapters for training UML on public data or the user's own folder (layouts: ``docs/datasets.md``).

Every adapter has the interface of :class:`~.base.DatasetAdapter`: ``case_ids()``, ``load(case_id) -> Case``,
``labels()``, ``groups()`` (patient of each case) and ``split(fractions, seed)``. Splits are made with
:func:`split_cases` and stored with :func:`write_split` / :func:`read_split`.

Imports inside this package are relative; import it as ``training.datasets`` from the repository root.
"""

from __future__ import annotations

from .base import (
    SPLIT_NAMES,
    Case,
    DatasetAdapter,
    DatasetLayoutError,
    read_split,
    split_cases,
    write_split,
)
from .folder import FolderDataset
from .isic2017 import ISIC2017Dataset
from .ispy1 import ISPY1Dataset
from .refuge import REFUGEDataset, refuge_mask_to_labels

__all__ = [
    "Case",
    "DatasetAdapter",
    "DatasetLayoutError",
    "SPLIT_NAMES",
    "split_cases",
    "write_split",
    "read_split",
    "ISPY1Dataset",
    "REFUGEDataset",
    "refuge_mask_to_labels",
    "ISIC2017Dataset",
    "FolderDataset",
    "ADAPTERS",
    "open_dataset",
]

#: Adapter classes by the name a command line uses (``--dataset ispy1``).
ADAPTERS = {
    "ispy1": ISPY1Dataset,
    "refuge": REFUGEDataset,
    "isic2017": ISIC2017Dataset,
    "folder": FolderDataset,
}


def open_dataset(kind: str, root, **options) -> DatasetAdapter:
    """Open ``root`` with the adapter named ``kind`` (a key of :data:`ADAPTERS`); ``options`` go to it."""
    try:
        cls = ADAPTERS[kind]
    except KeyError:
        raise DatasetLayoutError(f"unknown dataset kind {kind!r}; use one of {sorted(ADAPTERS)}") from None
    return cls(root, **options)
