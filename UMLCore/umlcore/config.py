"""Typed architecture configuration of the UML network (round-trips to JSON)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["UMLConfig", "PRESETS", "PresetName", "ClsPool", "CLS_POOLS"]

PresetName = Literal["small", "medium", "paper"]
ClsPool = Literal["avg", "avg+max", "avg+max+lesion"]
CLS_POOLS: tuple[str, ...] = ("avg", "avg+max", "avg+max+lesion")


@dataclass(frozen=True)
class UMLConfig:
    """Architecture of :class:`umlcore.network.UMLNet`.

    Args:
        in_channels: Input channels per slice (DCE phases, adjacent slices or RGB).
        num_classes: Image-level classes of the Uncertainty Instructor (>= 2).
        num_seg_labels: Segmentation labels including background (>= 2).
        cls_widths: Channels of the classification encoder at H, H/2, H/4, H/8.
        seg_widths: Channels of the segmentation encoder at H, H/2, H/4, H/8.
        mutual_widths: Channels of the mixed / mutual-decoder features at H, H/2, H/4, H/8.
        cls_blocks: Residual blocks per level of the classification encoder.
        seg_blocks: Residual blocks per level of the segmentation encoder.
        cls_head_width: Channels of the instructor's feature map ``F``.
        dropout: Dropout before the classifier's linear layer.
        cls_pool: How the instructor pools ``F'`` into one vector: ``"avg"`` (global average, the paper's),
            ``"avg+max"`` (global average and global max, concatenated) or ``"avg+max+lesion"`` (both, and the
            average weighted by the segmentation's foreground probability, so the opinion is read from the
            segmented lesion rather than from whatever else in the slice looks alike, e.g. an enhancing heart).
            A breast lesion covers a few of the 1,024 cells of a 256x256 slice's H/8 map, so an average alone
            dilutes it ~1000-fold.
    """

    in_channels: int = 3
    num_classes: int = 2
    num_seg_labels: int = 2
    cls_widths: tuple[int, int, int, int] = (8, 16, 32, 64)
    seg_widths: tuple[int, int, int, int] = (8, 16, 32, 64)
    mutual_widths: tuple[int, int, int, int] = (8, 16, 32, 64)
    cls_blocks: tuple[int, int, int, int] = (1, 1, 1, 1)
    seg_blocks: tuple[int, int, int, int] = (1, 1, 1, 2)
    cls_head_width: int = 64
    dropout: float = 0.1
    cls_pool: ClsPool = "avg"

    def __post_init__(self) -> None:
        for name in ("cls_widths", "seg_widths", "mutual_widths", "cls_blocks", "seg_blocks"):
            value = tuple(int(v) for v in getattr(self, name))
            if len(value) != 4 or min(value) < 1:
                raise ValueError(f"UMLConfig.{name} must be 4 positive integers (one per level H, H/2, H/4, H/8), got {value}")
            object.__setattr__(self, name, value)
        if self.in_channels < 1:
            raise ValueError(f"UMLConfig.in_channels must be >= 1, got {self.in_channels}")
        if self.num_classes < 2:
            raise ValueError(f"UMLConfig.num_classes must be >= 2, got {self.num_classes}")
        if self.num_seg_labels < 2:
            raise ValueError(f"UMLConfig.num_seg_labels must be >= 2 (background + at least one segment), got {self.num_seg_labels}")
        if self.cls_pool not in CLS_POOLS:
            raise ValueError(f"UMLConfig.cls_pool must be one of {', '.join(map(repr, CLS_POOLS))}, got {self.cls_pool!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"UMLConfig.dropout must be in [0, 1), got {self.dropout}")

    @property
    def pad_multiple(self) -> int:
        """Spatial sizes must be multiples of this (three stride-2 stages)."""
        return 8

    @classmethod
    def preset(cls, name: PresetName, **overrides: Any) -> "UMLConfig":
        """A named preset (``"small"``, ``"medium"`` or ``"paper"``) with optional field overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "UMLConfig":
        if not isinstance(data, dict):
            raise ValueError(f"architecture config must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown architecture fields {unknown}; known fields are {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "UMLConfig":
        return cls.from_dict(json.loads(text))


PRESETS: dict[str, UMLConfig] = {
    # Compact: <= 3 GFLOP per 256x256 slice (measured in Testing/umlcore/test_network.py).
    "small": UMLConfig(cls_pool="avg+max+lesion"),
    # Twice the small widths (16..128): about 4x its parameters (1.75 M, 7 MB) and compute (<= 11 GFLOP per
    # 256x256 slice), for the small lesions the small preset misses.
    "medium": UMLConfig(
        cls_widths=(16, 32, 64, 128),
        seg_widths=(16, 32, 64, 128),
        mutual_widths=(16, 32, 64, 128),
        cls_head_width=128,
        cls_pool="avg+max+lesion",
    ),
    # Paper scale: encoder widths of the ResNet/VGG ladders (64..512), deeper stages.
    "paper": UMLConfig(
        cls_widths=(64, 128, 256, 512),
        seg_widths=(64, 128, 256, 512),
        mutual_widths=(64, 128, 256, 256),
        cls_blocks=(2, 2, 3, 3),
        seg_blocks=(2, 2, 3, 3),
        cls_head_width=512,
        dropout=0.3,
    ),
}
