"""In-memory slice sets for training and validation: volumes -> normalised axial slices -> batches.

A :class:`VolumeCase` holds one case already normalised exactly as the predictor normalises it, with the
slicing axis first, so the network sees the same intensities in training and at inference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from umlcore.card import Normalization
from umlcore.preprocess import (context_indices, inplane_axes, normalize, pad_to_multiple, slice_axis_index,
                                to_slices, with_context)
from umlcore.synthetic import SyntheticCase

__all__ = ["VolumeCase", "case_from_synthetic", "SliceSampler", "LesionSampling", "predict_volume"]

LesionSampling = Literal["slice", "lesion"]


@dataclass
class VolumeCase:
    """One normalised case, slicing axis first.

    Attributes:
        channels: ``(C, Z, Y, X)`` float32, one channel per model input (e.g. pre / early / late).
        singles: ``(M, Z, Y, X)`` float32 extra single-volume views a user may load alone (the subtraction
            image); with each channel they train the "one volume, replicated" input mode; may be empty.
        mask: ``(Z, Y, X)`` uint8 labels.
        label: Reported (possibly noisy) case label.
        clean_label: Noise-free label where known, else ``label``.
        spacing: ``(x, y, z)`` voxel size in mm after the axis move.
        slice_label: The slices' class targets (:meth:`slice_labels`): ``lesion`` (the synthetic suspicion task)
            or ``case`` (the case label on every slice, e.g. pCR).
    """

    case_id: str
    channels: np.ndarray
    singles: np.ndarray
    mask: np.ndarray
    label: int
    clean_label: int
    spacing: tuple[float, float, float]
    slice_label: Literal["lesion", "case"] = "lesion"

    @property
    def lesion_slices(self) -> np.ndarray:
        return np.flatnonzero(self.mask.reshape(self.mask.shape[0], -1).any(axis=1))

    def slice_labels(self) -> np.ndarray:
        """Per-slice class targets. ``lesion``: the case label on slices with a lesion (or on every slice of a case
        without lesions); 0 on lesion-free slices of a case that has a lesion elsewhere. ``case``: the case label."""
        has = self.mask.reshape(self.mask.shape[0], -1).any(axis=1)
        if self.slice_label == "case" or not has.any():
            return np.full(self.mask.shape[0], self.label, dtype=np.int64)
        return np.where(has, self.label, 0).astype(np.int64)


def case_from_synthetic(case: SyntheticCase, norm: Normalization) -> VolumeCase:
    """Normalise a synthetic case and slice it along patient-axial exactly as the predictor does."""
    axis = slice_axis_index(case.direction, "axial")
    w_axis, h_axis = inplane_axes(axis)
    channels = np.stack([to_slices(normalize(p, norm), axis) for p in case.phases])  # (3, S, H, W)
    subtraction = to_slices(normalize(case.phases[1] - case.phases[0], norm), axis)
    singles = np.ascontiguousarray(subtraction[None], dtype=np.float32)
    mask = np.ascontiguousarray(to_slices(case.mask, axis), dtype=np.uint8)
    spacing = (float(case.spacing[w_axis]), float(case.spacing[h_axis]), float(case.spacing[axis]))
    return VolumeCase(f"synthetic-{case.seed}", np.ascontiguousarray(channels, dtype=np.float32), singles, mask,
                      int(case.label), int(case.clean_label), spacing)


class SliceSampler:
    """Random training batches of 2D slices with lesion oversampling, crops and augmentation, in torch.

    The cases are held as tensors on ``device`` and every step (picking, cropping, rotating, photometric jitter)
    runs there, so a GPU is not starved by a CPU data pipeline; on the CPU it is the same code.

    Args:
        cases: Training cases (any in-plane sizes).
        crop: Square crop size (a multiple of 8); slices smaller than that are zero-padded. A crop as large as
            the slices trains on whole slices (all the context the predictor sees).
        lesion_fraction: Share of each batch drawn from slices that contain a lesion.
        single_volume_prob: Probability that a sample replaces its channels by one replicated
            single volume (trains the one-volume input mode).
        seed: Seed of the sampler's own generator (numpy for the choices, torch for the noise).
        device: Where the cases live and the batches are made.
        channel_jitter: Half-width of the per-channel log-intensity jitter on top of the shared gamma /
            contrast (0.03 = +-3 %, the generator's own per-phase drift).
        noise_max: Each sample gets Gaussian noise of a sigma drawn uniformly from ``[0, noise_max]`` (in the
            normalised intensity units, where the 0.5-99.5 percentile range is 1), independent per channel.
            ``python -m training.evaluate --noise`` tests robustness up to sigma 0.2.
        lesion_sampling: How the lesion share of a batch is drawn. ``"slice"``: every slice with a lesion is
            equally likely, so a lesion weighs as many slices as it spans (a 2 cm mass about ten times a 4 mm
            one). ``"lesion"``: every lesion (3D connected component of a case's mask) is equally likely, then
            one of its slices, and the crop keeps that lesion in view: small lesions are seen as often as large.
        context_slices: 2.5D input: each sample also carries its ``k`` neighbouring slices on either side as
            extra channels, ordered as the predictor orders them (:func:`umlcore.preprocess.with_context`); the
            mask and the class are the centre slice's. ``0``: 2D slices.
    """

    def __init__(self, cases: Sequence[VolumeCase], crop: int, lesion_fraction: float = 0.5,
                 single_volume_prob: float = 0.3, seed: int = 0, device: "torch.device | str" = "cpu",
                 channel_jitter: float = 0.03, noise_max: float = 0.03,
                 lesion_sampling: LesionSampling = "slice", context_slices: int = 0) -> None:
        if crop % 8:
            raise ValueError(f"crop must be a multiple of 8, got {crop}")
        if not 0.0 <= channel_jitter < 0.5:
            raise ValueError(f"channel_jitter must be in [0, 0.5), got {channel_jitter}")
        if not 0.0 <= noise_max < 1.0:
            raise ValueError(f"noise_max must be in [0, 1) (a sigma in normalised units), got {noise_max}")
        if lesion_sampling not in ("slice", "lesion"):
            raise ValueError(f"lesion_sampling must be 'slice' or 'lesion', got {lesion_sampling!r}")
        if not 0 <= context_slices <= 8:
            raise ValueError(f"context_slices must be in 0..8, got {context_slices}")
        self.context_slices = context_slices
        self.channel_jitter = channel_jitter
        self.noise_max = noise_max
        self.lesion_sampling = lesion_sampling
        self.device = torch.device(device)
        self.crop = crop
        self.lesion_fraction = lesion_fraction
        self.single_volume_prob = single_volume_prob
        self.n_channels = cases[0].channels.shape[0]
        self.channels: list[torch.Tensor] = []  # per case (C, Z, H, W); on the CPU they share the cases' memory
        self.singles: list[torch.Tensor] = []  # per case (M, Z, H, W), the single-volume views (subtraction)
        self.masks: list[torch.Tensor] = []
        self.lesion_pixels: list[list[np.ndarray]] = []  # on the host: choosing a crop never waits for the device
        self.labels: list[np.ndarray] = []
        self._draws: list[list[tuple[int, np.ndarray, float]]] = []  # per case: (slice, pixels to keep, weight)
        self._add(cases)
        self.reseed(seed)

    def _add(self, cases: Sequence[VolumeCase]) -> None:
        """Append ``cases`` (their one device copy and host-side lesion index) and rebuild the draw tables."""
        for c in cases:
            if c.channels.shape[0] != self.n_channels:
                raise ValueError(f"case {c.case_id} has {c.channels.shape[0]} channels, the sampler's cases "
                                 f"{self.n_channels}; give cases of one kind")
            self.channels.append(torch.from_numpy(c.channels).to(self.device))
            self.singles.append(torch.from_numpy(c.singles).to(self.device))
            self.masks.append(torch.from_numpy(c.mask).to(self.device))
            self.lesion_pixels.append([np.argwhere(c.mask[z]) for z in range(c.mask.shape[0])])
            self.labels.append(c.slice_labels())
            draws: list[tuple[int, np.ndarray, float]] = []
            if self.lesion_sampling == "slice":
                draws = [(int(z), self.lesion_pixels[-1][z], 1.0) for z in c.lesion_slices]
            else:
                labels, _ = ndimage.label(c.mask > 0)  # a 3D component spans contiguous slices
                for k, box in enumerate(ndimage.find_objects(labels), start=1):
                    span = range(box[0].start, box[0].stop)
                    draws += [(z, np.argwhere(labels[z] == k), 1.0 / len(span)) for z in span]
            self._draws.append(draws)
        self.all_slices = [(i, z) for i, m in enumerate(self.masks) for z in range(m.shape[0])]
        self.lesion_slices = [(i, z) for i, d in enumerate(self._draws) for z in sorted({z for z, _, _ in d})]
        # the lesion share's draws: (case, slice, the (y, x) a crop keeps in view) and their probabilities
        self.lesion_draws = [(i, z, px) for i, d in enumerate(self._draws) for z, px, _ in d]
        w = np.asarray([wt for d in self._draws for _, _, wt in d])
        self.lesion_cdf = np.cumsum(w) / w.sum() if w.size else w

    def advance(self, new_cases: Sequence[VolumeCase]) -> None:
        """Slide the window of training cases: drop the ``len(new_cases)`` oldest, append ``new_cases``.

        The number of cases stays the same; the random streams go on (a resumed run rebuilds its window).
        """
        n = len(new_cases)
        if n > len(self.channels):
            raise ValueError(f"cannot replace {n} of the sampler's {len(self.channels)} cases; give at most as many")
        for table in (self.channels, self.singles, self.masks, self.lesion_pixels, self.labels, self._draws):
            del table[:n]
        self._add(new_cases)

    def reseed(self, seed: int) -> None:
        """Restart both random streams (``--resume`` reseeds with the step it continues from)."""
        self.rng = np.random.default_rng(seed)
        self.gen = torch.Generator(device=self.device).manual_seed(int(seed))

    def _pick(self) -> tuple[int, int, np.ndarray]:
        """A slice ``(case, z, lesion pixels to keep in view)``: from the lesion draws with probability
        ``lesion_fraction``, else any slice."""
        if self.lesion_draws and self.rng.random() < self.lesion_fraction:
            k = int(np.searchsorted(self.lesion_cdf, self.rng.random(), side="right"))
            return self.lesion_draws[min(k, len(self.lesion_draws) - 1)]
        i, z = self.all_slices[self.rng.integers(len(self.all_slices))]
        return i, z, self.lesion_pixels[i][z]

    def _sample(self) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
        """One cropped, rotated / flipped slice, its mask, its class and whether it is one replicated volume."""
        i, z, lesion = self._pick()
        channels, c, k = self.channels[i], self.n_channels, self.context_slices
        n_slices = channels.shape[1]
        replicated = bool(self.rng.random() < self.single_volume_prob)
        if k == 0:
            zs: "int | slice | list[int]" = z
        elif k <= z < n_slices - k:  # the centre slice and its neighbours: a view, no index tensor
            zs = slice(z - k, z + k + 1)
        else:  # near the ends the edge slice repeats (as the predictor does)
            zs = context_indices(np.array([z]), n_slices, k)[0].tolist()
        if replicated:  # one of the channels or of the single views, the same in every channel
            v = int(self.rng.integers(c + len(self.singles[i])))
            single = (channels[v] if v < c else self.singles[i][v - c])[zs]
            image = single.expand(c, *single.shape)
        else:
            image = channels[:, zs]
        if k:
            image = image.reshape(c * (2 * k + 1), *image.shape[-2:])  # per channel: slices z - k .. z + k
        image, mask = self._crop(image, self.masks[i][z], lesion)
        turns = int(self.rng.integers(4))  # flips and 90-degree rotations (the generator already varies orientation)
        image, mask = torch.rot90(image, turns, dims=(1, 2)), torch.rot90(mask, turns, dims=(0, 1))
        if self.rng.random() < 0.5:
            image, mask = image.flip(2), mask.flip(1)
        return image, mask, int(self.labels[i][z]), replicated

    def _crop(self, image: torch.Tensor, mask: torch.Tensor, lesion: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.crop
        pad_h, pad_w = max(0, c - mask.shape[0]), max(0, c - mask.shape[1])
        if pad_h or pad_w:
            image = F.pad(image, (0, pad_w, 0, pad_h))
            mask = F.pad(mask, (0, pad_w, 0, pad_h))
        h, w = mask.shape
        if len(lesion) and self.rng.random() < 0.8:  # keep (part of) the lesion in view
            y, x = (int(v) for v in lesion[self.rng.integers(len(lesion))])
            y0 = int(np.clip(y - self.rng.integers(c), 0, h - c))
            x0 = int(np.clip(x - self.rng.integers(c), 0, w - c))
        else:
            y0, x0 = int(self.rng.integers(h - c + 1)), int(self.rng.integers(w - c + 1))
        return image[:, y0:y0 + c, x0:x0 + c], mask[y0:y0 + c, x0:x0 + c]

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x (B, C, crop, crop) float32, seg (B, crop, crop) int64, cls (B,) int64)`` on ``device``."""
        samples = [self._sample() for _ in range(size)]
        x = torch.stack([s[0] for s in samples]).float()
        seg = torch.stack([s[1] for s in samples]).long()
        cls = torch.tensor([s[2] for s in samples], dtype=torch.int64, device=self.device)
        # photometric augmentation: one gamma and one contrast per sample, shared by its channels, with a small
        # per-channel jitter (as the generator's per-phase drift), then additive noise of a random level.
        # Independent per-channel gamma / contrast of +-15 % would scramble the early -> late change (+-12-35 %)
        # that the case label (washout kinetics) is read from, and make replicated single volumes differ.
        gamma = torch.exp(0.2 * torch.randn((size, 1, 1, 1), generator=self.gen, device=self.device))
        contrast = 0.85 + 0.3 * torch.rand((size, 1, 1, 1), generator=self.gen, device=self.device)
        jitter = (self.channel_jitter * (2 * torch.rand((size, self.n_channels, 1, 1), generator=self.gen,
                                                         device=self.device) - 1)).exp()
        jitter = jitter.repeat_interleave(2 * self.context_slices + 1, dim=1)  # a phase's slices share its scale
        replicated = torch.tensor([s[3] for s in samples], device=self.device).view(-1, 1, 1, 1)
        jitter = torch.where(replicated, torch.ones_like(jitter), jitter)  # one volume: its channels stay equal
        sigma = self.noise_max * torch.rand((size, 1, 1, 1), generator=self.gen, device=self.device)
        x = x.clamp_min(0) ** gamma * (contrast * jitter) + sigma * torch.randn(x.shape, generator=self.gen,
                                                                                  device=self.device)
        return x, seg, cls


def predict_volume(model: torch.nn.Module, channels: np.ndarray, batch_size: int = 16,
                   device: Optional[torch.device] = None,
                   context_slices: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Slice-wise prediction of a normalised ``(C, Z, Y, X)`` volume (with ``context_slices`` neighbours per
    side as extra channels for a 2.5D model, as the predictor gives them).

    Returns:
        ``seg_alpha (Z, K, Y, X)``, ``cls_alpha (Z, Kc)`` as float32 numpy arrays, and the labelmap ``(Z, Y, X)``.
    """
    device = device or torch.device("cpu")
    c, z, h, w = channels.shape
    stack = np.moveaxis(channels, 0, 1)  # (Z, C, Y, X)
    seg, cls = [], []
    with torch.inference_mode():
        for s in range(0, z, batch_size):
            batch = with_context(stack, s, min(s + batch_size, z), context_slices)
            x = torch.from_numpy(np.ascontiguousarray(batch)).to(device)
            out = model(pad_to_multiple(x, 8))
            seg.append(out.seg_alpha[..., :h, :w].float().cpu().numpy())
            cls.append(out.cls_alpha.float().cpu().numpy())
    seg_alpha = np.concatenate(seg)
    return seg_alpha, np.concatenate(cls), seg_alpha.argmax(1).astype(np.uint8)
