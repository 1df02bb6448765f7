"""Seeded synthetic breast DCE-MRI cases (three phases, lesion mask, case label) for training and tests.

Public breast MRI cannot be downloaded in this project's build environment, so the first shipped model is
trained on these cases. Everything is numpy (no scipy, no torch); one 48 x 128 x 128 case takes well under
a second on a laptop CPU. The anatomy, the lesion phenotypes, the label rule and the domain randomisation
are documented with their numbers in ``docs/synthetic-data.md``.

The label rule (:func:`case_label`): a case is **suspicious (1)** iff it has a lesion whose kinetics is
``washout`` or whose margin is ``spiculated``; otherwise (including no lesion) it is **0**. The reported
``label`` is ``clean_label`` flipped with probability ``label_noise``.

Geometry: arrays are in SimpleITK's ``GetArrayFromImage`` order ``(z, y, x)`` = index ``(k, j, i)``; spacing,
origin and direction are in SimpleITK's (LPS, index ``i, j, k``) order. The anatomy is built on an axial grid
(``i`` -> patient left, ``j`` -> posterior, ``k`` -> superior) and, with ``randomize="full"``, the stored
array is then permuted / flipped with a matching direction matrix, so :meth:`SyntheticCase.axial_axis`
recovers the slicing axis from the geometry alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import numpy as np

from .errors import UMLInputError

__all__ = [
    "Randomize",
    "Margin",
    "Kinetics",
    "PHASES",
    "MARGINS",
    "KINETICS",
    "SyntheticCase",
    "generate_case",
    "is_suspicious",
    "case_label",
]

Randomize = Literal["none", "light", "full"]
Margin = Literal["smooth", "lobulated", "spiculated"]
Kinetics = Literal["persistent", "plateau", "washout"]

PHASES: tuple[str, str, str] = ("pre", "early", "late")
MARGINS: tuple[str, ...] = ("smooth", "lobulated", "spiculated")
KINETICS: tuple[str, ...] = ("persistent", "plateau", "washout")

# Phenotype and lesion-count distributions (documented in docs/synthetic-data.md).
_MARGIN_P = (0.4, 0.3, 0.3)
_KINETICS_P = (0.4, 0.3, 0.3)
_COUNT_P = {1: 0.65, 2: 0.22, 3: 0.09, 4: 0.04}
# Late-phase change relative to the early phase (S_late / S_early - 1), kept clear of the +-10 % boundaries.
_LATE_CHANGE = {"persistent": (0.12, 0.35), "plateau": (-0.05, 0.05), "washout": (-0.35, -0.12)}
# Early relative enhancement (S_early / S_pre - 1) of lesions.
_EARLY_ENHANCEMENT = (0.8, 2.5)

# Nominal pre-contrast intensities (arbitrary units, non-fat-suppressed T1w, fat = 1000) and relative
# enhancement (early, late) of each tissue.
_TISSUE = {
    "fat": (1000.0, 0.02, 0.03),
    "skin": (650.0, 0.15, 0.25),
    "fgt": (420.0, 0.0, 0.0),  # enhancement = background parenchymal enhancement (per case)
    "muscle": (450.0, 0.10, 0.18),
    "rib": (720.0, 0.05, 0.08),  # fatty marrow
    "lung": (40.0, 0.10, 0.10),
    "blood": (380.0, 2.0, 1.2),  # heart / aorta blood pool
    "myocardium": (470.0, 0.9, 0.7),
    "vertebra": (650.0, 0.20, 0.25),
    "mediastinum": (650.0, 0.15, 0.2),  # mixed fat / soft tissue / small vessels
    "csf": (150.0, 0.0, 0.0),
    "vessel": (380.0, 0.0, 0.0),  # per vessel, see _vessels
}
_FAT_SAT = {"fat": 0.15, "rib": 0.35, "vertebra": 0.45, "mediastinum": 0.25}
# Background parenchymal enhancement levels: (probability, early RE range); late = early * U(1.3, 1.6).
_BPE = {"minimal": (0.35, (0.03, 0.10)), "mild": (0.40, (0.10, 0.25)),
        "moderate": (0.18, (0.25, 0.45)), "marked": (0.07, (0.45, 0.75))}
# Fibroglandular density (BI-RADS a-d): (probability, fraction of the breast volume).
_DENSITY = {"a": (0.15, (0.04, 0.10)), "b": (0.40, (0.10, 0.28)),
            "c": (0.35, (0.28, 0.50)), "d": (0.10, (0.50, 0.72))}


@dataclass
class SyntheticCase:
    """One synthetic DCE-MRI case.

    Attributes:
        phases: float32 ``(3, Z, Y, X)``: pre-contrast, early and late post-contrast (array order of
            ``sitk.GetArrayFromImage``; with ``randomize="full"`` the axes may be permuted / flipped, see
            :meth:`axial_axis`).
        mask: uint8 ``(Z, Y, X)``, 1 = lesion (partial-volume fraction > 0.5), 0 elsewhere.
        label: Reported (possibly noisy) case label: 1 = suspicious, 0 = not.
        clean_label: The label given by :func:`case_label` before label noise.
        spacing: Voxel size in mm, SimpleITK order ``(i, j, k)`` = array axes ``(2, 1, 0)``.
        origin: LPS position (mm) of voxel ``(0, 0, 0)``.
        direction: Row-major 3x3 direction cosines (column ``c`` = LPS direction of index axis ``c``).
        lesions: One dict per lesion: ``center`` (LPS mm), ``center_index`` (array index ``(z, y, x)``),
            ``radius_mm``, ``margin``, ``kinetics``, ``early_enhancement``, ``late_change``, ``voxels``.
        seed: The seed the case was generated from.
        info: Acquisition / anatomy parameters drawn for this case (view, fat suppression, density, ...);
            ``motion_voxels`` is the in-plane shift ``(y, x)`` (voxels of the axial grid) by which the pre-contrast
            phase was moved against the post-contrast phases and the mask (``(0.0, 0.0)`` without motion).
    """

    phases: np.ndarray
    mask: np.ndarray
    label: int
    clean_label: int
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    lesions: list[dict[str, Any]]
    seed: int
    info: dict[str, Any] = field(default_factory=dict)

    def axial_axis(self) -> int:
        """The array axis (0, 1 or 2 of ``mask``; ``phases`` is one more) that runs patient inferior-superior.

        Read from the direction matrix: the index axis whose direction has the largest LPS ``S`` component.
        """
        d = np.asarray(self.direction, dtype=float).reshape(3, 3)
        index_axis = int(np.argmax(np.abs(d[2, :])))
        return 2 - index_axis

    def axial_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Phases ``(3, Z, Y, X)`` and mask ``(Z, Y, X)`` reoriented to the axial LPS grid.

        Undoes the axis permutation / flips of ``randomize="full"``: array axes become patient
        inferior->superior, anterior->posterior, right->left (what ``sitk.DICOMOrient(image, "LPS")``
        gives). Returns views where possible (no copy of the data is forced).
        """
        d = np.asarray(self.direction, dtype=float).reshape(3, 3)
        order, flips = [], []
        for lps in (2, 1, 0):  # S, P, L
            index_axis = int(np.argmax(np.abs(d[lps, :])))
            order.append(2 - index_axis)
            flips.append(d[lps, index_axis] < 0)
        mask = np.transpose(self.mask, order)
        phases = np.transpose(self.phases, (0, *(o + 1 for o in order)))
        flip_axes = tuple(a for a in range(3) if flips[a])
        if flip_axes:
            mask = np.flip(mask, axis=flip_axes)
            phases = np.flip(phases, axis=tuple(a + 1 for a in flip_axes))
        return phases, mask

    def _image(self, array: np.ndarray):
        import SimpleITK as sitk

        image = sitk.GetImageFromArray(np.ascontiguousarray(array), isVector=False)
        image.SetSpacing(tuple(float(v) for v in self.spacing))
        image.SetOrigin(tuple(float(v) for v in self.origin))
        image.SetDirection(tuple(float(v) for v in self.direction))
        return image

    def to_sitk(self) -> list:
        """The three phases as 3D ``sitk.Image`` (float32) with this case's spacing, origin and direction."""
        return [self._image(self.phases[i]) for i in range(self.phases.shape[0])]

    def mask_sitk(self):
        """The lesion mask as a 3D uint8 ``sitk.Image`` on the same grid."""
        return self._image(self.mask)


def is_suspicious(margin: str, kinetics: str) -> bool:
    """The phenotype rule: washout kinetics or a spiculated margin is suspicious."""
    return kinetics == "washout" or margin == "spiculated"


def case_label(lesions: list[dict[str, Any]]) -> int:
    """Case label from lesion phenotypes: 1 iff any lesion :func:`is_suspicious`, else 0 (also for no lesion)."""
    return int(any(is_suspicious(les["margin"], les["kinetics"]) for les in lesions))


# ----------------------------------------------------------------------------------------------- helpers


def _choice(rng: np.random.Generator, options: dict) -> Any:
    keys = list(options)
    probs = np.array([options[k][0] if isinstance(options[k], tuple) else options[k] for k in keys], float)
    return keys[int(rng.choice(len(keys), p=probs / probs.sum()))]


def _ramp(x: np.ndarray, width: float) -> np.ndarray:
    """Partial-volume fraction of "inside" for a signed distance ``x`` (mm, > 0 inside)."""
    return np.clip(0.5 + x / width, 0.0, 1.0)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int, int], spacing_zyx: tuple[float, float, float],
                  sigmas_mm: list[tuple[float, float, float, float]]) -> np.ndarray:
    """Zero-mean, unit-std Gaussian random field: white noise filtered by a sum of Gaussians.

    Args:
        sigmas_mm: ``(weight, sigma_z, sigma_y, sigma_x)`` per component, sigmas in mm.
    """
    white = rng.standard_normal(shape, dtype=np.float32)
    spec = np.fft.rfftn(white)
    fz = np.fft.fftfreq(shape[0], d=spacing_zyx[0]).astype(np.float32)[:, None, None]
    fy = np.fft.fftfreq(shape[1], d=spacing_zyx[1]).astype(np.float32)[None, :, None]
    fx = np.fft.rfftfreq(shape[2], d=spacing_zyx[2]).astype(np.float32)[None, None, :]
    filt = np.zeros(spec.shape, np.float32)
    for weight, sz, sy, sx in sigmas_mm:
        filt += np.float32(weight) * np.exp(-2.0 * math.pi ** 2 * ((fz * sz) ** 2 + (fy * sy) ** 2 + (fx * sx) ** 2))
    field_ = np.fft.irfftn(spec * filt, s=shape, axes=(0, 1, 2)).astype(np.float32)
    field_ -= field_.mean()
    std = float(field_.std())
    return field_ / std if std > 0 else field_


def _blur_axis(a: np.ndarray, sigma: float, axis: int) -> np.ndarray:
    """Gaussian blur (sigma in voxels) along one axis by shifted adds, edges replicated."""
    if sigma < 0.15 or a.shape[axis] < 2:
        return a
    radius = max(1, int(math.ceil(2.5 * sigma)))
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k = (k / k.sum()).astype(np.float32)
    pad = [(0, 0)] * a.ndim
    pad[axis] = (radius, radius)
    padded = np.pad(a, pad, mode="edge")
    out = np.zeros_like(a)
    n = a.shape[axis]
    for i, w in enumerate(k):
        sl = [slice(None)] * a.ndim
        sl[axis] = slice(i, i + n)
        out += w * padded[tuple(sl)]
    return out


def _shift_axis(a: np.ndarray, shift: float, axis: int) -> np.ndarray:
    """Translate ``a`` by ``shift`` voxels along ``axis`` (linear interpolation, edges replicated)."""
    n = a.shape[axis]
    src = np.clip(np.arange(n, dtype=np.float32) - np.float32(shift), 0, n - 1)
    i0 = np.floor(src).astype(np.intp)
    i1 = np.minimum(i0 + 1, n - 1)
    w = (src - i0).astype(np.float32)
    shape = [1] * a.ndim
    shape[axis] = n
    w = w.reshape(shape)
    return np.take(a, i0, axis=axis) * (1.0 - w) + np.take(a, i1, axis=axis) * w


def _index_range(coords: np.ndarray, lo: float, hi: float) -> slice:
    """Slice of a regular coordinate vector covering [lo, hi] mm (may be empty)."""
    c0 = float(coords[0])
    step = float(coords[1] - coords[0]) if coords.size > 1 else 1.0
    i0 = int(math.floor((lo - c0) / step))
    i1 = int(math.ceil((hi - c0) / step)) + 1
    return slice(max(0, i0), min(coords.size, max(0, i1)))


def _segment_soft(out: np.ndarray, zc: np.ndarray, yc: np.ndarray, xc: np.ndarray, p0: np.ndarray,
                  p1: np.ndarray, r0: float, r1: float, width: float) -> None:
    """Max-composite a tapered tube from ``p0`` to ``p1`` (mm, (z, y, x)) into ``out`` (grid ``zc, yc, xc``)."""
    rmax = max(r0, r1) + width
    lo = np.minimum(p0, p1) - rmax
    hi = np.maximum(p0, p1) + rmax
    sz, sy, sx = _index_range(zc, lo[0], hi[0]), _index_range(yc, lo[1], hi[1]), _index_range(xc, lo[2], hi[2])
    if sz.start >= sz.stop or sy.start >= sy.stop or sx.start >= sx.stop:
        return
    dz = zc[sz][:, None, None] - p0[0]
    dy = yc[sy][None, :, None] - p0[1]
    dx = xc[sx][None, None, :] - p0[2]
    seg = p1 - p0
    length2 = float(seg @ seg)
    if length2 <= 1e-9:
        t = np.zeros((1, 1, 1), np.float32)
    else:
        t = np.clip((dz * seg[0] + dy * seg[1] + dx * seg[2]) / length2, 0.0, 1.0)
    dist = np.sqrt((dz - t * seg[0]) ** 2 + (dy - t * seg[1]) ** 2 + (dx - t * seg[2]) ** 2)
    radius = r0 + (r1 - r0) * t
    view = out[sz, sy, sx]
    np.maximum(view, _ramp(radius - dist, width), out=view)


def _paint(img: np.ndarray, frac: Any, values: Any) -> None:
    """Partial-volume compositing ``img[c] += frac * (values[c] - img[c])`` on the bounding box of ``frac > 0``.

    Args:
        img: ``(3, Z, Y, X)`` phases, modified in place.
        frac: Tissue fraction in [0, 1], broadcastable to ``(Z, Y, X)``.
        values: Per phase, a scalar or an array broadcastable to ``(Z, Y, X)``.
    """
    frac = np.asarray(frac, np.float32)
    frac = frac.reshape((1,) * (3 - frac.ndim) + frac.shape)
    nonzero = frac > 0
    box = []
    for ax in range(3):
        if frac.shape[ax] == 1:
            box.append(slice(None))
            continue
        hit = np.flatnonzero(nonzero.any(axis=tuple(a for a in range(3) if a != ax)))
        if hit.size == 0:
            return
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))

    def sub(a: Any) -> Any:
        a = np.asarray(a, np.float32)
        if a.ndim < 3:
            return a
        return a[tuple(box[ax] if a.shape[ax] > 1 else slice(None) for ax in range(3))]

    f = sub(frac)
    for c in range(3):
        target = img[c][tuple(box)]
        target += f * (sub(values[c]) - target)


def _random_unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


# ---------------------------------------------------------------------------------------------- the case


def _validate(seed: Any, shape: Any, randomize: Any, label_noise: Any, lesion_prob: Any) -> tuple[int, int, int]:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UMLInputError(f"generate_case: seed must be a non-negative int, got {seed!r}")
    try:
        shape_t = tuple(int(v) for v in shape)
    except TypeError:
        raise UMLInputError(f"generate_case: shape must be 3 ints (Z, Y, X), got {shape!r}") from None
    if len(shape_t) != 3 or min(shape_t) < 4 or shape_t[1] < 16 or shape_t[2] < 16:
        raise UMLInputError(
            f"generate_case: shape must be (Z, Y, X) with Z >= 4 and Y, X >= 16, got {shape!r}; e.g. (48, 128, 128)")
    if randomize not in ("none", "light", "full"):
        raise UMLInputError(f"generate_case: randomize must be 'none', 'light' or 'full', got {randomize!r}")
    for name, value in (("label_noise", label_noise), ("lesion_prob", lesion_prob)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
            raise UMLInputError(f"generate_case: {name} must be a probability in [0, 1], got {value!r}")
    if float(label_noise) > 0.5:
        raise UMLInputError(f"generate_case: label_noise must be <= 0.5 (above that the labels invert), got {label_noise!r}")
    return shape_t  # type: ignore[return-value]


def generate_case(seed: int, shape: tuple[int, int, int] = (48, 128, 128), randomize: Randomize = "full",
                  label_noise: float = 0.05, lesion_prob: float = 0.78) -> SyntheticCase:
    """Generate one synthetic breast DCE-MRI case, deterministically from ``seed``.

    Args:
        seed: Non-negative integer; the same arguments give bit-identical cases.
        shape: ``(Z, Y, X)`` of the axial acquisition grid (Z slices of Y x X pixels). With
            ``randomize="full"`` the stored arrays are a permutation of this shape (see
            :meth:`SyntheticCase.axial_axis`).
        randomize: Domain randomisation: ``"none"`` (fixed bilateral view, nominal intensities, canonical
            orientation, slight noise), ``"light"`` (random field of view / spacing, mild intensity,
            bias and noise changes) or ``"full"`` (also fat suppression, contrast curves, blur, offsets,
            quantisation, random axis order and flips).
        label_noise: Probability of flipping the reported ``label`` (``clean_label`` is kept).
        lesion_prob: Probability that the case has at least one lesion.

    Returns:
        A :class:`SyntheticCase`; its ``clean_label`` is ``case_label(case.lesions)``.

    Raises:
        UMLInputError: An argument is out of range (the message names the fix).
    """
    shape = _validate(seed, shape, randomize, label_noise, lesion_prob)
    r_pheno, r_anat, r_acq, r_tex, r_noise, r_label = (
        np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(6))
    Z, Y, X = shape

    # ---- phenotype (independent of the grid, so the clean label depends on the seed only) ----------
    n_lesions = 0
    if r_pheno.random() < lesion_prob:
        n_lesions = int(r_pheno.choice(list(_COUNT_P), p=np.array(list(_COUNT_P.values())) / sum(_COUNT_P.values())))
    margin = str(r_pheno.choice(MARGINS, p=_MARGIN_P))
    kinetics = str(r_pheno.choice(KINETICS, p=_KINETICS_P))
    early_enh = float(r_pheno.uniform(*_EARLY_ENHANCEMENT))
    late_change = float(r_pheno.uniform(*_LATE_CHANGE[kinetics]))
    diam_main = float(np.exp(r_pheno.uniform(math.log(4.0), math.log(30.0))))
    flip_label = bool(r_label.random() < label_noise)

    # ---- anatomy (patient frame, mm: x right->left, y anterior->posterior, z inferior->superior) ------
    a_t = r_anat.uniform(135.0, 170.0)  # thorax half-width
    b_t = r_anat.uniform(95.0, 125.0)  # thorax half-depth
    y_c = b_t  # thorax centre; the anterior chest wall is at y = 0 in the midline
    breasts = []
    for side in (-1.0, 1.0):
        bx = r_anat.uniform(65.0, 92.0)
        rb = r_anat.uniform(48.0, max(50.0, min(82.0, a_t - 12.0 - bx)))
        breasts.append(dict(
            x=side * bx, z=r_anat.uniform(-8.0, 8.0), rb=rb, rz=rb * r_anat.uniform(0.85, 1.15),
            depth=r_anat.uniform(40.0, 110.0), gamma=r_anat.uniform(0.4, 0.75),
            shear_x=side * r_anat.uniform(-0.05, 0.25), shear_z=r_anat.uniform(-0.25, 0.1),
            harm=r_anat.uniform(-0.07, 0.07, size=(3, 2)), nipple=r_anat.uniform(2.0, 7.0),
        ))
    # asymmetry is mild
    breasts[1]["depth"] = breasts[0]["depth"] * r_anat.uniform(0.85, 1.15)
    skin_mm = r_anat.uniform(1.2, 2.4)
    subcut_mm = r_anat.uniform(3.0, 10.0)
    retro_mm = r_anat.uniform(2.0, 8.0)
    wall_fat = r_anat.uniform(3.0, 9.0)
    muscle_mm = r_anat.uniform(6.0, 16.0)
    rib_mm = r_anat.uniform(7.0, 11.0)
    back_fat = r_anat.uniform(5.0, 25.0)
    back_muscle = r_anat.uniform(20.0, 45.0)
    mediastinum_mm = r_anat.uniform(10.0, 20.0)
    thorax_harm = np.stack([r_anat.uniform(0.0, 0.04, 3), r_anat.uniform(0.0, 2 * math.pi, 3)], axis=1)
    rib_period = r_anat.uniform(22.0, 30.0)
    rib_phase = r_anat.uniform(0.0, rib_period)
    rib_slope = r_anat.uniform(0.15, 0.45)
    density = _choice(r_anat, _DENSITY)
    fgt_fraction = r_anat.uniform(*_DENSITY[density][1])
    bpe = _choice(r_anat, _BPE)
    bpe_early = r_anat.uniform(*_BPE[bpe][1])
    bpe_late = bpe_early * r_anat.uniform(1.3, 1.6)
    heart = dict(x=r_anat.uniform(5.0, 35.0), z=r_anat.uniform(-70.0, -15.0), rx=r_anat.uniform(50.0, 65.0),
                 ry=r_anat.uniform(42.0, 55.0), rz=r_anat.uniform(50.0, 65.0))

    # ---- acquisition geometry -------------------------------------------------------------------------
    if randomize == "none":
        view, fov_x, sz = "bilateral", 340.0, 2.0
    else:
        view = _choice(r_acq, {"bilateral": 0.5, "unilateral": 0.3, "zoom": 0.2} if randomize == "full"
                       else {"bilateral": 0.6, "unilateral": 0.4})
        fov_x = {"bilateral": r_acq.uniform(300.0, 380.0), "unilateral": r_acq.uniform(150.0, 220.0),
                 "zoom": X * r_acq.uniform(0.6, 1.0)}[view]
        sz = r_acq.uniform(1.5, 3.0)
    sxy = fov_x / X
    spacing_zyx = (sz, sxy, sxy)
    w_eff = math.sqrt((2 * sxy ** 2 + sz ** 2) / 3.0)  # partial-volume ramp width (mm)
    side_i = int(r_acq.integers(2))
    br = breasts[side_i]
    jitter = 0.0 if randomize == "none" else 1.0
    if view == "bilateral":
        x_c = jitter * r_acq.uniform(-15.0, 15.0)
        z_c = jitter * r_acq.uniform(-12.0, 12.0)
        y0 = -max(b["depth"] for b in breasts) - (15.0 if randomize == "none" else r_acq.uniform(5.0, 35.0))
    elif view == "unilateral":
        x_c = br["x"] + r_acq.uniform(-15.0, 15.0)
        z_c = br["z"] + r_acq.uniform(-12.0, 12.0)
        y0 = -br["depth"] - r_acq.uniform(5.0, 30.0)
    else:  # zoom: a window inside one breast
        x_c = br["x"] + r_acq.uniform(-0.35, 0.35) * br["rb"]
        z_c = br["z"] + r_acq.uniform(-0.3, 0.3) * br["rz"]
        y_mid = -br["depth"] * r_acq.uniform(0.25, 0.75)
        y0 = y_mid - 0.5 * Y * sxy
    xc = (x_c + (np.arange(X) - (X - 1) / 2.0) * sxy).astype(np.float32)
    yc = (y0 + np.arange(Y) * sxy).astype(np.float32)
    zc = (z_c + (np.arange(Z) - (Z - 1) / 2.0) * sz).astype(np.float32)
    xx, yy, zz = xc[None, None, :], yc[None, :, None], zc[:, None, None]

    # ---- implicit surfaces ----------------------------------------------------------------------------
    x_rel = np.clip(xx / a_t, -0.999, 0.999)
    y_cw = (y_c - b_t * np.sqrt(1.0 - x_rel ** 2)).astype(np.float32)  # (1,1,X) anterior chest wall
    t = y_cw - yy  # (1,Y,X) depth anterior of the chest wall
    t_pos = np.maximum(t, 0.0)
    f_body = None
    for b in breasts:
        u = xx - b["x"] - b["shear_x"] * t_pos
        v = (zz - b["z"] - b["shear_z"] * t_pos) * (b["rb"] / b["rz"])
        q = 1.0 - (u * u + v * v) / (b["rb"] ** 2)
        u2, v2 = xx - b["x"], (zz - b["z"]) * (b["rb"] / b["rz"])  # unsheared, (Z,1,X)
        phi = np.arctan2(v2, u2)
        rho2 = np.minimum(np.sqrt(u2 * u2 + v2 * v2) / b["rb"], 1.0)
        harm = 1.0 + rho2 * sum(b["harm"][k, 0] * np.cos((k + 1) * phi) + b["harm"][k, 1] * np.sin((k + 1) * phi)
                                for k in range(3))
        nipple = b["nipple"] * np.exp((q - 1.0) * (b["rb"] / 7.0) ** 2)  # exp(-(rho / 7 mm)^2)
        tmax = b["depth"] * np.power(np.maximum(q, 0.0), b["gamma"]) * harm + nipple
        f_b = np.minimum(np.minimum(tmax - t, t + 8.0), q * (b["rb"] * 0.5))
        f_body = f_b if f_body is None else np.maximum(f_body, f_b)
    # thorax ellipse: approximate signed distance (> 0 inside), 2D
    ex, ey = xx / a_t, (yy - y_c) / b_t
    theta = np.arctan2(ey, ex)
    wobble = 1.0 + sum(thorax_harm[k, 0] * np.cos((k + 2) * theta + thorax_harm[k, 1]) for k in range(3))
    r_e = np.sqrt(ex ** 2 + ey ** 2) / wobble + 1e-6
    grad = np.sqrt((ex / a_t) ** 2 + (ey / b_t) ** 2) / r_e
    d_t = ((1.0 - r_e) / np.maximum(grad, 1e-6)).astype(np.float32)  # (1,Y,X)
    f_body = np.maximum(f_body, d_t).astype(np.float32)
    gz, gy, gx = np.gradient(f_body, *spacing_zyx)
    gnorm = np.sqrt(gz ** 2 + gy ** 2 + gx ** 2)
    d = f_body / np.maximum(gnorm, 0.3)  # ~ distance to the skin surface, mm, > 0 inside
    occ = _ramp(d, w_eff)
    inner = _ramp(d - skin_mm, w_eff)

    # ---- tissue values (nominal, then per-case contrast jitter) ---------------------------------------
    fat_sat = randomize == "full" and r_acq.random() < 0.35
    tissue_jitter = {"none": 0.0, "light": 0.08, "full": 0.15}[randomize]
    tv: dict[str, np.ndarray] = {}
    for name, (pre, e1, e2) in _TISSUE.items():
        pre = pre * (1.0 + r_acq.uniform(-tissue_jitter, tissue_jitter))
        if fat_sat:
            pre *= _FAT_SAT.get(name, 1.0)
        tv[name] = np.array([pre, pre * (1 + e1), pre * (1 + e2)], np.float32)

    img = np.zeros((3, Z, Y, X), np.float32)
    for c in range(3):
        img[c] = inner * tv["fat"][c] + (occ - inner) * tv["skin"][c]

    # thorax wall layers (thicker posteriorly: back fat and paraspinal muscles) and contents
    in_thorax = _ramp(d_t, w_eff)
    post = ((1.0 + np.clip((yy - y_c) / (b_t * r_e), -1.0, 1.0)) / 2.0) ** 2  # 0 anterior .. 1 posterior, (1,Y,X)
    fat_hi = wall_fat + post * back_fat
    mus_hi = fat_hi + muscle_mm + post * back_muscle
    rib_lo, rib_hi = mus_hi + 1.0, mus_hi + 1.0 + rib_mm
    ones_z = np.ones((Z, 1, 1), np.float32)
    band = lambda lo, hi: _ramp(d_t - lo, w_eff) - _ramp(d_t - hi, w_eff)  # noqa: E731
    _paint(img, band(fat_hi, mus_hi) * ones_z, tv["muscle"])
    arc = np.abs(np.arctan2(xx / a_t, (y_c - yy) / b_t)) * (0.5 * (a_t + b_t))  # mm from the anterior midline
    rib_on = np.clip((np.cos(2 * math.pi * (zz - rib_phase - rib_slope * arc) / rib_period) - 0.25)
                     * (rib_period / (2 * math.pi * w_eff)) + 0.5, 0.0, 1.0)
    rib_on = np.maximum(rib_on, _ramp(14.0 - np.abs(xx), w_eff) * _ramp(y_c - yy, w_eff))  # sternum
    rib_band = band(rib_lo, rib_hi)
    _paint(img, rib_band * rib_on, tv["rib"])
    _paint(img, rib_band * (1.0 - rib_on), tv["muscle"])
    interior = _ramp(d_t - rib_hi - 1.0, w_eff)  # (1,Y,X)
    # lungs either side of the mediastinum (a midline band, wider anteriorly where the heart lies)
    _paint(img, interior * ones_z, tv["lung"])
    medi_w = mediastinum_mm * (1.0 + 0.8 * np.clip((yy - y_c) / b_t, 0.0, 1.0))  # wider around the spine
    _paint(img, (_ramp(medi_w - np.abs(xx), w_eff) * interior) * ones_z, tv["mediastinum"])
    # heart (myocardium around the blood pool), anterior left mediastinum, seen in the inferior slices
    hy = float(y_c - b_t) + wall_fat + muscle_mm + rib_mm + 2.0 + heart["ry"]
    hr = np.sqrt(((xx - heart["x"]) / heart["rx"]) ** 2 + ((yy - hy) / heart["ry"]) ** 2
                 + ((zz - heart["z"]) / heart["rz"]) ** 2)
    _paint(img, _ramp((1.0 - hr) * heart["ry"], w_eff) * in_thorax, tv["myocardium"])
    _paint(img, _ramp((0.8 - hr) * heart["ry"], w_eff) * in_thorax, tv["blood"])
    # spine: vertebral body + spinal canal at the posterior of the interior; descending aorta beside it
    vy = float(y_c + b_t) - (wall_fat + back_fat + muscle_mm + back_muscle) * 0.75 - 12.0
    vert = _ramp(16.0 - np.sqrt(xx ** 2 + (yy - vy) ** 2), w_eff) * in_thorax
    _paint(img, vert * ones_z, tv["vertebra"])
    canal = _ramp(6.0 - np.sqrt(xx ** 2 + (yy - vy - 24.0) ** 2), w_eff) * in_thorax
    _paint(img, canal * ones_z, tv["csf"])
    aorta = _ramp(11.0 - np.sqrt((xx - 24.0) ** 2 + (yy - vy + 6.0) ** 2), w_eff) * in_thorax
    _paint(img, aorta * ones_z, tv["blood"])

    # breast compartment: fibroglandular tissue (random smooth field, denser centrally)
    breast = _ramp(-d_t - retro_mm, w_eff) * _ramp(d - skin_mm - subcut_mm, w_eff)
    tex = _smooth_noise(r_tex, shape, spacing_zyx, [(1.0, 8.0, 14.0, 8.0), (0.7, 2.5, 4.5, 2.5), (0.2, 1.0, 1.5, 1.0)])
    centre = np.zeros_like(d)
    for b in breasts:
        u = xx - b["x"] - b["shear_x"] * t_pos
        v = (zz - b["z"] - b["shear_z"] * t_pos) * (b["rb"] / b["rz"])
        centre = np.maximum(centre, 1.0 - np.sqrt(u * u + v * v) / b["rb"])
    fgt_field = tex + 3.0 * centre
    sel = breast > 0.5
    if sel.any():
        thr = float(np.quantile(fgt_field[sel][:: max(1, int(sel.sum()) // 20000)], 1.0 - fgt_fraction))
    else:
        thr = float(fgt_field.max()) + 1.0
    fgt = np.clip((fgt_field - thr) / 0.6 + 0.5, 0.0, 1.0) * breast
    bpe_map = np.clip(1.0 + 0.35 * tex, 0.3, 2.0)
    fgt_pre = tv["fgt"][0] * np.clip(1.0 + 0.08 * tex, 0.7, 1.3)
    fgt_vals = (fgt_pre, fgt_pre * (1 + bpe_early * bpe_map), fgt_pre * (1 + bpe_late * bpe_map))
    _paint(img, fgt, fgt_vals)

    # vessels: internal mammary (parasternal, along z) and branching breast vessels (random walks)
    vessels = np.zeros(shape, np.float32)
    for side in (-1.0, 1.0):
        vx = side * r_anat.uniform(22.0, 32.0)
        vy_ = float(y_c - b_t * math.sqrt(1 - (vx / a_t) ** 2)) + wall_fat + muscle_mm + rib_mm + 4.0
        _segment_soft(vessels, zc, yc, xc, np.array([zc.min() - 5, vy_, vx]), np.array([zc.max() + 5, vy_, vx]),
                      1.8, 1.8, w_eff)
    n_vessels = int(r_anat.integers(4, 11))
    for b in breasts:
        for _ in range(n_vessels):
            ang = r_anat.uniform(0, 2 * math.pi)
            rad = r_anat.uniform(0.3, 0.95) * b["rb"]
            px, pz = b["x"] + rad * math.cos(ang), b["z"] + rad * math.sin(ang) * b["rz"] / b["rb"]
            py = float(y_c - b_t * math.sqrt(max(1e-6, 1 - (px / a_t) ** 2))) - r_anat.uniform(2.0, 15.0)
            p = np.array([pz, py, px])
            direction = np.array([r_anat.uniform(-0.8, 0.8), -r_anat.uniform(0.2, 1.0), 0.0])
            direction[2] = -0.5 * math.cos(ang)  # converge towards the nipple
            direction /= np.linalg.norm(direction)
            radius = r_anat.uniform(0.7, 2.2)
            for _step in range(int(r_anat.integers(5, 14))):
                direction = direction + r_anat.normal(0, 0.35, 3)
                direction[1] = min(direction[1], 0.25)
                direction /= np.linalg.norm(direction)
                q_ = p + direction * r_anat.uniform(6.0, 12.0)
                r_next = max(0.5, radius * 0.93)
                _segment_soft(vessels, zc, yc, xc, p, q_, radius, r_next, w_eff)
                p, radius = q_, r_next
    vessels *= inner
    v_e1 = r_anat.uniform(1.2, 2.8)
    v_e2 = (1 + v_e1) * r_anat.uniform(0.8, 1.05) - 1
    vpre = tv["vessel"][0]
    _paint(img, vessels, (vpre, vpre * (1 + v_e1), vpre * (1 + v_e2)))

    # ---- lesions ---------------------------------------------------------------------------------------
    mask = np.zeros(shape, np.uint8)
    lesions: list[dict[str, Any]] = []
    if n_lesions:
        floor_r = 0.5 * max(sxy, sz)
        depth_ok = (d > skin_mm + 3.0) & (-d_t > retro_mm + 2.0)
        cand = np.flatnonzero(depth_ok & (breast > 0.5))
        if cand.size == 0:
            cand = np.flatnonzero(depth_ok)
        if cand.size:
            weights = fgt.ravel()[cand] + 0.15
            weights = weights / weights.sum()
            first: Optional[np.ndarray] = None
            for k in range(n_lesions):
                diam = diam_main if k == 0 else diam_main * r_pheno.uniform(0.3, 0.8)
                radius = max(float(diam) / 2.0, floor_r, 2.0)
                if first is None:
                    idx = int(cand[r_pheno.choice(cand.size, p=weights)])
                else:
                    iz, iy, ix = np.unravel_index(cand, shape)
                    dist = np.sqrt(((iz - first[0]) * sz) ** 2 + ((iy - first[1]) * sxy) ** 2
                                   + ((ix - first[2]) * sxy) ** 2)
                    near = cand[(dist > 8.0 + radius) & (dist < 45.0)]
                    pool = near if near.size else cand
                    idx = int(pool[r_pheno.integers(pool.size)])
                zi, yi, xi = np.unravel_index(idx, shape)
                if first is None:
                    first = np.array([zi, yi, xi])
                info = _paint_lesion(img, mask, r_pheno, (zc, yc, xc), (int(zi), int(yi), int(xi)), radius,
                                     margin, early_enh * r_pheno.uniform(0.9, 1.1), late_change,
                                     tv["fgt"][0] * r_pheno.uniform(0.85, 1.05), tex, w_eff)
                lesions.append(dict(center=(float(xc[xi]), float(yc[yi]), float(zc[zi])),
                                    center_index=(int(zi), int(yi), int(xi)), radius_mm=round(radius, 3),
                                    margin=margin, kinetics=kinetics, **info))
    clean = case_label(lesions)
    label = 1 - clean if flip_label else clean

    # ---- acquisition: bias field, contrast, blur, Rician noise, offset ---------------------------------
    strength = {"none": 0.0, "light": 0.5, "full": 1.0}[randomize]
    scale = 1.0 if randomize == "none" else float(np.exp(r_acq.uniform(-1.0, 0.45) * strength))
    # breast-coil sensitivity: signal falls off posterior of the chest wall (none: nominal profile)
    coil_len = 60.0 if randomize == "none" else r_acq.uniform(35.0, 120.0)
    coil_floor = 0.12 if randomize == "none" else r_acq.uniform(0.05, 0.35)
    coil = coil_floor + (1.0 - coil_floor) * np.exp(-np.maximum(yc, 0.0) / coil_len)
    img *= coil.astype(np.float32)[None, None, :, None]
    if strength:
        lz = (zc - zc.mean()) / 100.0
        ly = (yc - yc.min()) / 200.0
        lx = (xc - xc.mean()) / 200.0
        log_bias = (strength * (r_acq.uniform(-0.25, 0.25) * lx[None, None, :] + r_acq.uniform(-0.15, 0.15) * lz[:, None, None])
                    - strength * r_acq.uniform(0.0, 0.6) * ly[None, :, None]
                    + strength * r_acq.uniform(0.0, 0.15) * np.cos(math.pi * (lx[None, None, :] * r_acq.uniform(1, 3)
                                                                              + ly[None, :, None] * r_acq.uniform(1, 3))
                                                                   + r_acq.uniform(0, 2 * math.pi)))
        img *= np.exp(log_bias).astype(np.float32)
    img *= scale
    ref = 1000.0 * scale
    if randomize == "full":
        gamma0 = r_acq.uniform(0.85, 1.15)
        for c in range(3):
            gamma = gamma0 * (1.0 if c == 0 else r_acq.uniform(0.97, 1.03))
            phase_scale = 1.0 if c == 0 else r_acq.uniform(0.95, 1.05)
            img[c] = ref * np.power(np.maximum(img[c], 0.0) / ref, gamma) * phase_scale
        blur_xy, blur_z = r_acq.uniform(0.0, 0.8), r_acq.uniform(0.0, 0.6)
    elif randomize == "light":
        blur_xy, blur_z = r_acq.uniform(0.0, 0.4), 0.0
    else:
        blur_xy, blur_z = 0.0, 0.0
    for c in range(3):
        a = _blur_axis(img[c], blur_xy, 1)
        a = _blur_axis(a, blur_xy, 2)
        img[c] = _blur_axis(a, blur_z, 0)
    noise_frac = {"none": 0.01, "light": r_acq.uniform(0.01, 0.03), "full": r_acq.uniform(0.008, 0.05)}[randomize]
    sigma = noise_frac * ref * (0.5 if fat_sat else 1.0)  # the receiver scales to the brightest tissue
    motion = (0.0, 0.0)
    if randomize == "full" and r_acq.random() < 0.5:
        # patient motion between the pre-contrast and the post-contrast phases (sub-voxel to ~1.5 voxel). The
        # mask stays where the lesion is seen, on the post-contrast phases (where a reader draws it), so it is
        # the pre-contrast phase that moves
        dy, dx = r_acq.uniform(-1.5, 1.5), r_acq.uniform(-1.5, 1.5)
        img[0] = _shift_axis(_shift_axis(img[0], -dy, 1), -dx, 2)
        motion = (float(-dy), float(-dx))
    for c in range(3):
        s = sigma * (1.0 if randomize == "none" else r_acq.uniform(0.9, 1.1))
        n1 = r_noise.standard_normal(shape, dtype=np.float32)
        n2 = r_noise.standard_normal(shape, dtype=np.float32)
        img[c] = np.sqrt((img[c] + s * n1) ** 2 + (s * n2) ** 2)
    if randomize == "full":
        if r_acq.random() < 0.5:
            img += np.float32(r_acq.uniform(-0.03, 0.08) * ref)
        if r_acq.random() < 0.5:
            np.round(img, out=img)

    # ---- orientation -----------------------------------------------------------------------------------
    spacing_np = np.array([sz, sxy, sxy])  # per canonical array axis
    axes_phys = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # LPS direction per array axis
    origin = np.array([xc[0], yc[0], zc[0]], float)
    perm = np.arange(3)
    flips = np.zeros(3, bool)
    if randomize == "full":
        if r_acq.random() < 0.5:
            perm = r_acq.permutation(3)
        flips = r_acq.random(3) < 0.3
    n_canon = np.array(shape)
    for a in range(3):
        if flips[a]:
            p = perm[a]
            origin = origin + (n_canon[p] - 1) * spacing_np[p] * axes_phys[p]
    dirs = np.array([axes_phys[perm[a]] * (-1.0 if flips[a] else 1.0) for a in range(3)])  # per new array axis
    new_spacing = np.array([spacing_np[perm[a]] for a in range(3)])
    img = np.transpose(img, (0, *(perm + 1)))
    mask = np.transpose(mask, tuple(perm))
    flip_axes = tuple(int(a) for a in range(3) if flips[a])
    if flip_axes:
        img = np.flip(img, axis=tuple(a + 1 for a in flip_axes))
        mask = np.flip(mask, axis=flip_axes)
    img = np.ascontiguousarray(img, dtype=np.float32)
    mask = np.ascontiguousarray(mask, dtype=np.uint8)
    for les in lesions:
        ci = np.array(les["center_index"])[perm]
        for a in flip_axes:
            ci[a] = n_canon[perm[a]] - 1 - ci[a]
        les["center_index"] = tuple(int(v) for v in ci)
    direction_m = np.stack([dirs[2], dirs[1], dirs[0]], axis=1)  # columns = index axes i, j, k
    return SyntheticCase(
        phases=img, mask=mask, label=int(label), clean_label=int(clean),
        spacing=(float(new_spacing[2]), float(new_spacing[1]), float(new_spacing[0])),
        origin=tuple(float(v) for v in origin),
        direction=tuple(float(v) for v in direction_m.ravel()),
        lesions=lesions, seed=int(seed),
        info=dict(view=view, fat_suppressed=bool(fat_sat), density=density, bpe=bpe, randomize=randomize,
                  noise_sigma=float(sigma), intensity_scale=float(scale), label_flipped=flip_label,
                  axial_shape=tuple(shape), slice_spacing=float(sz), pixel_spacing=float(sxy),
                  motion_voxels=motion),
    )


def _paint_lesion(img: np.ndarray, mask: np.ndarray, rng: np.random.Generator, coords: tuple,
                  centre_idx: tuple[int, int, int], radius: float, margin: str, early_enh: float,
                  late_change: float, pre: float, tex: np.ndarray, w_eff: float) -> dict[str, Any]:
    """Paint one lesion (soft partial-volume mask) into ``img`` and its label (soft > 0.5) into ``mask``."""
    zc, yc, xc = coords
    c = np.array([zc[centre_idx[0]], yc[centre_idx[1]], xc[centre_idx[2]]], float)
    axes = np.array([1.0, rng.uniform(0.7, 1.0), rng.uniform(0.6, 1.0)])
    axes = axes / np.cbrt(axes.prod())
    rot = _random_rotation(rng)
    spic_len = rng.uniform(0.8, 1.6) * radius + 3.0 if margin == "spiculated" else 0.0
    reach = radius * (1.5 if margin == "lobulated" else 1.2) * axes.max() + spic_len + 2 * w_eff
    sz_, sy_, sx_ = (_index_range(zc, c[0] - reach, c[0] + reach), _index_range(yc, c[1] - reach, c[1] + reach),
                     _index_range(xc, c[2] - reach, c[2] + reach))
    lz, ly, lx = zc[sz_] - c[0], yc[sy_] - c[1], xc[sx_] - c[2]
    pz, py, px = lz[:, None, None], ly[None, :, None], lx[None, None, :]
    # local (rotated, scaled) coordinates
    q = [rot[0, k] * pz + rot[1, k] * py + rot[2, k] * px for k in range(3)]
    qs = [q[k] / (radius * axes[k]) for k in range(3)]
    r = np.sqrt(qs[0] ** 2 + qs[1] ** 2 + qs[2] ** 2) + 1e-6
    u = [qs[k] / r for k in range(3)]
    if margin == "smooth":
        v = _random_unit(rng, 1)[0]
        f = 1.0 + 0.06 * (u[0] * v[0] + u[1] * v[1] + u[2] * v[2]) ** 2
    elif margin == "lobulated":
        f = np.ones_like(r)
        for v in _random_unit(rng, int(rng.integers(3, 7))):
            cos = np.maximum(u[0] * v[0] + u[1] * v[1] + u[2] * v[2], 0.0)
            f = f + rng.uniform(0.2, 0.45) * cos ** rng.uniform(4.0, 9.0)
        f = f / 1.1
    else:  # spiculated: irregular body + radiating spicules
        f = np.ones_like(r)
        for v in _random_unit(rng, 6):
            cos = np.maximum(u[0] * v[0] + u[1] * v[1] + u[2] * v[2], 0.0)
            f = f + rng.uniform(-0.12, 0.15) * cos ** 3
    soft = _ramp((f - r) * radius, w_eff).astype(np.float32)
    if margin == "spiculated":
        for v in _random_unit(rng, int(rng.integers(8, 17))):
            length = rng.uniform(0.5, 1.0) * spic_len
            world_v = rot @ (v * axes)
            world_v /= np.linalg.norm(world_v)
            p0 = world_v * radius * 0.6
            p1 = world_v * (radius * 0.9 + length)
            _segment_soft(soft, lz, ly, lx, p0, p1, rng.uniform(1.2, 2.2) + 0.08 * radius, 0.3, w_eff)
    # internal enhancement: heterogeneous, sometimes rim-enhancing (darker centre)
    het = np.clip(1.0 + 0.22 * tex[sz_, sy_, sx_], 0.4, 1.6)
    if margin != "smooth" and rng.random() < 0.4:
        het = het * np.clip(0.5 + 0.5 * r, 0.5, 1.0)
    e1 = early_enh * het
    early = pre * (1.0 + e1)
    late = early * (1.0 + late_change)
    for ch, val in enumerate((np.full_like(e1, pre), early, late)):
        view = img[ch][sz_, sy_, sx_]
        view += soft * (val - view)
    mview = mask[sz_, sy_, sx_]
    mview |= (soft > 0.5).astype(np.uint8)
    return dict(early_enhancement=round(float(early_enh), 4), late_change=round(float(late_change), 4),
                voxels=int((soft > 0.5).sum()))
