"""Model bundles: ``model.safetensors`` (weights only) + ``model.json`` (the model card, :mod:`umlcore.card`).

A bundle is a folder or a ``.zip`` of one. Loading verifies the card (schema, fields; a schema-1 card is migrated in
:func:`umlcore.card.migrate_v1`), the SHA-256 of the weights, and that the weights fit the declared architecture;
anything else is refused with a :class:`~umlcore.errors.BundleError` naming the problem and the fix. Nothing is
unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from .card import ModelCard, card_from_dict
from .errors import BundleError
from .network import UMLNet
from .reader import LesionReader

__all__ = ["WEIGHTS_FILE", "CARD_FILE", "ModelBundle", "save_bundle", "load_bundle", "read_card", "sha256_file"]

WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "model.json"
READER_PREFIX = "reader."  # the lesion reader's tensors in model.safetensors


@dataclass
class ModelBundle:
    """A loaded, verified bundle: the card, the network in eval mode, where it came from, its weights' hash, and the
    lesion reader (in eval mode) when the card has one."""

    card: ModelCard
    model: UMLNet
    path: Path
    sha256: str
    reader: Optional[LesionReader] = None


def sha256_file(path: os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_bundle(model: UMLNet, card: ModelCard, directory: os.PathLike, overwrite: bool = False,
                reader: Optional[LesionReader] = None) -> Path:
    """Write ``model.safetensors`` and ``model.json`` into ``directory`` atomically.

    The files are written into a temporary sibling folder which then replaces ``directory``, so a failure never
    leaves a half-written bundle. A ``reader`` (needs ``card.reader``) is stored as the ``reader.*`` tensors of
    ``model.safetensors``.
    """
    directory = Path(directory)
    if model.config != card.architecture:
        raise BundleError("the model's config differs from card.architecture: build the card from model.config")
    if (reader is None) != (card.reader is None):
        raise BundleError("give a reader exactly when the card has a reader section (and the other way round)")
    if directory.exists() and not overwrite:
        raise BundleError(f"{directory} already exists: choose another folder or pass overwrite=True")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        if reader is not None:
            state.update({f"{READER_PREFIX}{k}": v.detach().cpu().contiguous() for k, v in reader.state_dict().items()})
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})  # one key: a deterministic header
        digest = sha256_file(tmp / WEIGHTS_FILE)
        try:
            text = json.dumps(card.to_dict(digest), indent=2, allow_nan=False)
        except ValueError:
            raise BundleError("the card holds a NaN or infinite number, which JSON cannot: replace it (e.g. with "
                              "null) before saving") from None
        (tmp / CARD_FILE).write_text(text + "\n")
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _bundle_dir(path: Path, stack: list) -> Path:
    """A folder holding the bundle files; a zip is extracted into a temporary folder kept in ``stack``."""
    if not path.exists():
        raise BundleError(f"model {path} does not exist: give a bundle folder or .zip, or a model id from `uml models`")
    if path.is_dir():
        return path
    if zipfile.is_zipfile(path):
        tmp = tempfile.TemporaryDirectory(prefix="uml-bundle-")
        stack.append(tmp)
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if Path(n).name in (CARD_FILE, WEIGHTS_FILE)]
            for n in names:
                if Path(n).is_absolute() or ".." in Path(n).parts:
                    raise BundleError(f"{path} contains an unsafe path {n!r}: rebuild the zip from the bundle folder")
                (Path(tmp.name) / Path(n).name).write_bytes(zf.read(n))
        return Path(tmp.name)
    if path.name == CARD_FILE:
        return path.parent
    raise BundleError(f"{path} is not a model bundle: give a folder (or .zip) with {CARD_FILE} and {WEIGHTS_FILE}")


def read_card(path: os.PathLike) -> tuple[ModelCard, str]:
    """Read and validate the card of a bundle without loading the weights; returns ``(card, declared_sha256)``."""
    stack: list = []
    directory = _bundle_dir(Path(path), stack)
    card_path = directory / CARD_FILE
    if not card_path.is_file():
        raise BundleError(f"{path} has no {CARD_FILE}: a bundle needs {CARD_FILE} and {WEIGHTS_FILE}")
    try:
        data = json.loads(card_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{card_path} is not valid JSON ({exc}): re-export the bundle") from None
    card = card_from_dict(data, source=str(card_path))
    declared = data["weights"].get("sha256") if isinstance(data["weights"], dict) else None
    if not isinstance(declared, str) or len(declared) != 64:
        raise BundleError(f"{card_path} lacks weights.sha256: re-export the bundle with python -m training.export")
    return card, declared


def load_bundle(path: os.PathLike, device: str | torch.device = "cpu") -> ModelBundle:
    """Load and verify a bundle (folder, ``.zip``, or the path of its ``model.json``).

    Raises:
        BundleError: missing files, unknown schema version, missing fields, hash mismatch, or weights
            that do not fit the architecture.
    """
    path = Path(path)
    stack: list = []
    try:
        directory = _bundle_dir(path, stack)
        card, declared = read_card(directory)
        weights = directory / WEIGHTS_FILE
        if not weights.is_file():
            raise BundleError(f"{path} has no {WEIGHTS_FILE}: a bundle needs {CARD_FILE} and {WEIGHTS_FILE}")
        digest = sha256_file(weights)
        if digest != declared:
            raise BundleError(
                f"{weights} does not match the sha256 in {CARD_FILE} (file was changed or corrupted): "
                "restore the original bundle or re-export it"
            )
        try:
            state = load_file(str(weights))
        except Exception as exc:  # safetensors raises its own error types
            raise BundleError(f"{weights} is not a readable safetensors file ({exc}): re-export the bundle") from None
        reader_state = {k[len(READER_PREFIX):]: state.pop(k) for k in list(state) if k.startswith(READER_PREFIX)}
        model = UMLNet(card.architecture)
        reader = None
        try:
            model.load_state_dict(state, strict=True)
            if card.reader is not None:
                reader = LesionReader(card.reader_channels, card.reader.width)
                reader.load_state_dict(reader_state, strict=True)
                reader.eval().to(device)
            elif reader_state:
                raise RuntimeError("reader.* tensors but no reader section in the card")
        except RuntimeError as exc:
            first = str(exc).splitlines()[0]
            raise BundleError(f"weights in {path} do not fit the declared architecture ({first}): re-export the bundle") from None
        model.eval().to(device)
        return ModelBundle(card=card, model=model, path=path, sha256=digest, reader=reader)
    finally:
        for tmp in stack:
            tmp.cleanup()
