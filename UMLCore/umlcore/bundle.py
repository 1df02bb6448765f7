"""Model bundles: ``model.safetensors`` (weights only) + ``model.json`` (the model card, :mod:`umlcore.card`).

A bundle is a folder or a ``.zip`` of one. Loading verifies the whole bundle: the card (schema, fields; a schema-1
card is migrated in :func:`umlcore.card.migrate_v1`) and its own SHA-256 (``weights.card_sha256``: a card edited after
export is refused), the SHA-256 of the weights, their size (a zip is checked before it is unpacked) and that they fit
the declared architecture; anything else is refused with a :class:`~umlcore.errors.BundleError` naming the problem
and the fix. Nothing is unpickled.
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

from .card import ModelCard, card_digest, card_from_dict
from .errors import BundleError
from .network import UMLNet
from .reader import LesionReader

__all__ = ["WEIGHTS_FILE", "CARD_FILE", "MAX_WEIGHTS_BYTES", "ModelBundle", "save_bundle", "load_bundle", "read_card",
           "sha256_file"]

WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "model.json"
READER_PREFIX = "reader."  # the lesion reader's tensors in model.safetensors


@dataclass
class ModelBundle:
    """A loaded, verified bundle: the card, the network in eval mode, where it came from, its weights' hash, the
    lesion reader (in eval mode) when the card has one, and the card's own hash (``None``: a schema-1 card, which
    has none to verify)."""

    card: ModelCard
    model: UMLNet
    path: Path
    sha256: str
    reader: Optional[LesionReader] = None
    card_sha256: Optional[str] = None


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


#: The largest files a bundle may hold (the paper preset's weights are 0.18 GB): a larger one is refused before it
#: is read, hashed or unpacked.
MAX_WEIGHTS_BYTES = 2 << 30
MAX_CARD_BYTES = 16 << 20


def _extract(zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, limit: int, source: str) -> None:
    """``info`` of ``zf`` into ``target``, refused as soon as it is larger than ``limit`` (whatever the zip says)."""
    written = 0
    with zf.open(info) as src, open(target, "wb") as dst:
        while chunk := src.read(1 << 20):
            written += len(chunk)
            if written > limit:
                raise BundleError(f"{source} holds a {Path(info.filename).name} larger than the {limit >> 20} MB a "
                                  "bundle may hold: it is not a UML bundle (or a damaged one); re-export it")
            dst.write(chunk)


def _bundle_dir(path: Path, stack: list) -> Path:
    """A folder holding the bundle files; a zip is checked and extracted into a temporary folder kept in ``stack``."""
    if not path.exists():
        raise BundleError(f"model {path} does not exist: give a bundle folder or .zip, or a model id from `uml models`")
    if path.is_dir():
        return path
    if zipfile.is_zipfile(path):
        limits = {CARD_FILE: MAX_CARD_BYTES, WEIGHTS_FILE: MAX_WEIGHTS_BYTES}
        with zipfile.ZipFile(path) as zf:
            members = [i for i in zf.infolist() if Path(i.filename).name in limits]
            for info in members:
                name = Path(info.filename).name
                if Path(info.filename).is_absolute() or ".." in Path(info.filename).parts:
                    raise BundleError(f"{path} contains an unsafe path {info.filename!r}: rebuild the zip from the bundle folder")
                if info.file_size > limits[name]:
                    raise BundleError(f"{path} holds a {name} of {info.file_size / 2**30:.1f} GB, more than the "
                                      f"{limits[name] >> 20} MB a bundle may hold: it is not a UML bundle; re-export it")
            tmp = tempfile.TemporaryDirectory(prefix="uml-bundle-")
            stack.append(tmp)
            for info in members:
                _extract(zf, info, Path(tmp.name) / Path(info.filename).name, limits[Path(info.filename).name], str(path))
        return Path(tmp.name)
    if path.name == CARD_FILE:
        return path.parent
    raise BundleError(f"{path} is not a model bundle: give a folder (or .zip) with {CARD_FILE} and {WEIGHTS_FILE}")


def _read_card_file(directory: Path, shown: str) -> tuple[ModelCard, str, Optional[str]]:
    """The card in ``directory`` (named ``shown`` in messages), its declared weights hash and its own verified hash
    (``None`` for a schema-1 card, which has none)."""
    card_path = directory / CARD_FILE
    if not card_path.is_file():
        raise BundleError(f"{shown} has no {CARD_FILE}: a bundle needs {CARD_FILE} and {WEIGHTS_FILE}")
    if card_path.stat().st_size > MAX_CARD_BYTES:
        raise BundleError(f"{shown}'s {CARD_FILE} is larger than {MAX_CARD_BYTES >> 20} MB: it is not a model card")
    try:
        data = json.loads(card_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{shown}'s {CARD_FILE} is not valid JSON ({exc}): re-export the bundle") from None
    card = card_from_dict(data, source=f"{shown}'s {CARD_FILE}")
    weights = data["weights"] if isinstance(data["weights"], dict) else {}
    declared = weights.get("sha256")
    if not isinstance(declared, str) or len(declared) != 64:
        raise BundleError(f"{shown}'s {CARD_FILE} lacks weights.sha256: re-export the bundle with python -m training.export")
    if data.get("schema_version") == 1:
        return card, declared, None
    if weights.get("card_sha256") != card_digest(data):
        raise BundleError(f"{shown}'s {CARD_FILE} was changed after the bundle was exported (it no longer matches "
                          "weights.card_sha256): restore the original card, or re-export the bundle with python -m "
                          "training.export")
    return card, declared, weights["card_sha256"]


def read_card(path: os.PathLike) -> tuple[ModelCard, str]:
    """Read and verify the card of a bundle without loading the weights; returns ``(card, declared_sha256)``."""
    stack: list = []
    try:
        card, declared, _ = _read_card_file(_bundle_dir(Path(path), stack), str(path))
        return card, declared
    finally:
        for tmp in stack:
            tmp.cleanup()


def load_bundle(path: os.PathLike, device: str | torch.device = "cpu") -> ModelBundle:
    """Load and verify a bundle (folder, ``.zip``, or the path of its ``model.json``).

    Raises:
        BundleError: missing files, files larger than a bundle holds, unknown schema version, missing fields, a card
            changed after export, a weights hash mismatch, or weights that do not fit the architecture.
    """
    path = Path(path)
    stack: list = []
    try:
        directory = _bundle_dir(path, stack)
        card, declared, card_sha256 = _read_card_file(directory, str(path))
        weights = directory / WEIGHTS_FILE
        if not weights.is_file():
            raise BundleError(f"{path} has no {WEIGHTS_FILE}: a bundle needs {CARD_FILE} and {WEIGHTS_FILE}")
        if weights.stat().st_size > MAX_WEIGHTS_BYTES:
            raise BundleError(f"{path}'s {WEIGHTS_FILE} is larger than the {MAX_WEIGHTS_BYTES >> 20} MB a bundle may "
                              "hold: it is not a UML bundle; re-export it")
        digest = sha256_file(weights)
        if digest != declared:
            raise BundleError(f"{path}'s {WEIGHTS_FILE} does not match the sha256 in {CARD_FILE} (changed or "
                              "corrupted): restore the original bundle or re-export it")
        try:
            state = load_file(str(weights))
        except Exception as exc:  # safetensors raises its own error types
            raise BundleError(f"{path}'s {WEIGHTS_FILE} is not a readable safetensors file ({exc}): re-export the bundle") from None
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
        return ModelBundle(card=card, model=model, path=path, sha256=digest, reader=reader, card_sha256=card_sha256)
    finally:
        for tmp in stack:
            tmp.cleanup()
