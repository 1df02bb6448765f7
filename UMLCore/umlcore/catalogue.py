"""Where model bundles are found: the shipped ones first, then the user's folder."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from .bundle import CARD_FILE, ModelCard, read_card
from .errors import BundleError

__all__ = ["CatalogueEntry", "shipped_models_dir", "user_models_dir", "list_models", "resolve_model", "DEFAULT_MODEL_ID"]

DEFAULT_MODEL_ID = "uml-breast-dce-small"


@dataclass(frozen=True)
class CatalogueEntry:
    id: str
    path: Path
    shipped: bool
    card: Optional[ModelCard]
    error: Optional[str] = None


def shipped_models_dir() -> Path:
    """``Resources/Models`` of the repository / extension this package sits in."""
    return Path(__file__).resolve().parents[2] / "Resources" / "Models"


def user_models_dir() -> Path:
    """The user's own bundles: ``~/.uml/models``."""
    return Path.home() / ".uml" / "models"


def _bundles_in(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    found = [p for p in sorted(directory.iterdir()) if (p / CARD_FILE).is_file() or p.suffix == ".zip"]
    return found


def list_models(extra_dirs: Iterable[os.PathLike] = ()) -> list[CatalogueEntry]:
    """Bundles found in the shipped folder, the user folder and ``extra_dirs``; shipped ones first."""
    entries: list[CatalogueEntry] = []
    dirs = [(shipped_models_dir(), True), (user_models_dir(), False)] + [(Path(d), False) for d in extra_dirs]
    for directory, shipped in dirs:
        for p in _bundles_in(directory):
            try:
                card, _ = read_card(p)
                entries.append(CatalogueEntry(card.id, p, shipped, card))
            except BundleError as exc:
                entries.append(CatalogueEntry(p.stem, p, shipped, None, str(exc)))
    return entries


def resolve_model(spec: Optional[str | os.PathLike] = None, extra_dirs: Iterable[os.PathLike] = ()) -> Path:
    """A bundle path from a path, a model id, or ``None`` (the default shipped model)."""
    if spec is not None and (Path(spec).exists() or os.sep in str(spec) or str(spec).endswith((".zip", ".json"))):
        return Path(spec)
    wanted = DEFAULT_MODEL_ID if spec is None else str(spec)
    entries = list_models(extra_dirs)
    for e in entries:
        if e.id == wanted and e.card is not None:
            return e.path
    if spec is None and entries:
        usable = [e for e in entries if e.card is not None]
        if usable:
            return usable[0].path
    known = ", ".join(e.id for e in entries if e.card is not None) or "none found"
    raise BundleError(f"no model with id {wanted!r} (known: {known}): give a bundle path or an id listed by `uml models`")
