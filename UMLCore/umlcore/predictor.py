"""From a volume to results (DESIGN section 5): the slice-wise UML predictor.

Steps of :meth:`Predictor.predict`:

1. Channels as the bundle's card declares: one volume per network channel, or a single volume replicated into
   every channel (``missing_channels == "replicate"``); all volumes on one voxel grid. With the card's
   ``input.motion_correction`` mode ``"translation"``, the phases of a multi-phase case are moved onto its
   reference phase first (:func:`umlcore.registration.align_phases`); everything after reads the moved phases.
2. The index axis closest to the card's slicing axis (axial = patient S) becomes the slice axis (a pure axis
   permutation, undone exactly afterwards); each channel is normalised over its whole volume as declared;
   slices are resampled in-plane to ``target_spacing`` if the card asks, and zero-padded to a multiple of
   ``config.pad_multiple``. A 2.5D card (``input.context_slices = k``) gives each slice its ``k`` neighbours on
   either side as extra channels, batch by batch (:func:`umlcore.preprocess.with_context`).
3. Slices run through the network in batches under ``torch.inference_mode``, in strict fp32 by default (TF32
   off on CUDA, so a GPU gives the CPU's results) or, with ``precision="mixed"``, under bf16/fp16 autocast on
   CUDA (never on CPU); the cancel check runs before every batch; on CUDA out-of-memory the batch is halved
   down to 1 and then the run continues on the CPU.
4. Padding, resampling and the permutation are undone, so every output lies on the input voxel grid exactly
   (same size, spacing, origin, direction).
5. Labelmap = argmax of the final ``seg_alpha``; uncertainty = ``K / S`` of it; foreground probability =
   ``1 - p_background``; the case-level opinion fuses the per-slice classification Dirichlets with
   :func:`umlcore.fusion.fuse_slice_opinions` (lesion voxels per slice from the labelmap). The summary dict
   follows ``docs/summary-schema.md`` (``schema_version`` 1).
6. If the card has a lesion reader (:mod:`umlcore.reader`) and every channel came from its own volume, the reader
   scores the largest components of the filtered labelmap from patches of the normalised volumes, and its score
   is merged into the case opinion (:func:`umlcore.fusion.fuse_reader_opinion`) before the card's calibration;
   with the card's rule ``"stacked"`` the case opinion is a fitted logistic model of the network's and the most
   suspicious component's outputs (:func:`umlcore.fusion.stack_reader_opinion`), also where nothing was segmented.
7. If the card's reader has ``segmentation_min_lesion``, the reader also checks the segmentation of such a case:
   the labelmap written keeps the largest components of the *unfiltered* segmentation that it reads as lesions
   (:meth:`Predictor._verify_segmentation`); the case opinion of step 6 reads the filtered labelmap as before, or,
   with the card's ``reader.opinion_reads`` ``"checked"``, the checked one (the network's slice weights stay those of
   the filtered labelmap).
8. If the card has a lesion refiner (:mod:`umlcore.refiner`) and every channel came from its own volume, it redraws
   the small components of the labelmap in 3D, after the case opinion was read (the opinion is the same with or
   without it).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable, Literal, Optional, Sequence, Union

import numpy as np
import SimpleITK as sitk
import torch

from .bundle import NETWORK_TTA_MODES, ModelBundle
from .errors import CancelledError, UMLError, UMLInputError
from .fusion import (FUSION_RULE, READER_FUSION_RULES, calibrate_case_alpha, fuse_reader_opinion, fuse_slice_opinions,
                     stack_reader_opinion)
from .io import MIN_INPLANE_SIZE, check_same_grid, check_volume, geometry, split_4d
from .preprocess import (
    crop_to,
    from_slices,
    inplane_axes,
    normalize,
    pad_to_multiple,
    resize_slices,
    resized_shape,
    slice_axis_index,
    to_slices,
    with_context,
)
from .reader import (READER_TARGETS, component_centres, cut_patch, largest_components, most_suspicious, read_patches,
                     suspicion)
from .refiner import refine_labels
from .registration import PhaseAlignment, align_phases

__all__ = [
    "SUMMARY_SCHEMA_VERSION",
    "DeviceName",
    "Precision",
    "ProgressCallback",
    "CancelCheck",
    "Prediction",
    "Predictor",
    "resolve_device",
    "strict_fp32",
    "label_components",
    "remove_uncertain_components",
    "in_labelmap",
    "redrawn_sizes",
    "forward_views",
]

SUMMARY_SCHEMA_VERSION = 1

DeviceName = Literal["auto", "cpu", "cuda"]
Precision = Literal["fp32", "mixed"]
#: ``progress(stage, fraction, message)``: stage is ``preprocess`` | ``inference`` | ``postprocess``; the
#: fraction (0..1) runs over the whole prediction and never decreases.
ProgressCallback = Callable[[str, float, str], None]
#: ``cancel() -> True`` stops the run with :class:`~umlcore.errors.CancelledError`.
CancelCheck = Callable[[], bool]

# Share of the whole prediction taken by each stage (for the progress fraction).
_PRE_END, _INFER_END = 0.1, 0.9


@dataclass
class Prediction:
    """Results of one case, all images on the input voxel grid.

    Attributes:
        labelmap: uint8 segmentation labels (0 = background, then the card's segment labels).
        uncertainty: float32 voxel uncertainty ``u = K / S`` of the final segmentation Dirichlet, in [0, 1].
        probability: float32 foreground probability ``1 - p_background`` in [0, 1].
        summary: The case summary (``docs/summary-schema.md``).
    """

    labelmap: sitk.Image
    uncertainty: sitk.Image
    probability: Optional[sitk.Image]
    summary: dict


def label_components(labels: np.ndarray, uncertainty: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The 6-connected components of ``labels > 0`` (all segments together) and their size and mean uncertainty.

    Args:
        labels: ``(Z, Y, X)`` labelmap.
        uncertainty: ``(Z, Y, X)`` per-voxel uncertainty.

    Returns:
        ``components`` (``(Z, Y, X)`` int, 0 = background, 1..N), ``sizes`` ``(N + 1,)`` and ``mean_u`` ``(N + 1,)``
        indexed by component id (entry 0 describes the background).
    """
    mask = sitk.GetImageFromArray((labels > 0).astype(np.uint8))
    components = sitk.GetArrayFromImage(sitk.ConnectedComponent(mask, False))
    flat = components.ravel()
    sizes = np.bincount(flat, minlength=int(components.max()) + 1)
    sums = np.bincount(flat, weights=uncertainty.ravel().astype(np.float64), minlength=len(sizes))
    return components, sizes, sums / np.maximum(sizes, 1)


def remove_uncertain_components(labels: np.ndarray, uncertainty: np.ndarray,
                                max_uncertainty: float) -> tuple[np.ndarray, int]:
    """Drop the connected components of a labelmap whose mean voxel uncertainty exceeds ``max_uncertainty``.

    Components are those of :func:`label_components`. On the synthetic validation cases the false-positive blobs
    (enhancing vessels, heart, parenchyma) had a mean uncertainty of 0.05-0.3, the lesions 0.02-0.04
    (docs/model.md), so a threshold between them removes most false positives.

    Args:
        labels: ``(Z, Y, X)`` uint8 labelmap (not modified).
        uncertainty: ``(Z, Y, X)`` per-voxel uncertainty in [0, 1].
        max_uncertainty: Components with a larger mean uncertainty are set to 0.

    Returns:
        The filtered labelmap (a copy) and the number of components removed.
    """
    components, _, mean_u = label_components(labels, uncertainty)
    drop = mean_u > max_uncertainty
    drop[0] = False  # the background is not a component
    out = labels.copy()
    out[drop[components]] = 0
    return out, int(drop.sum())


def in_labelmap(read: np.ndarray, written: np.ndarray, count: int) -> list[bool]:
    """Whether each of the ``count`` largest components of ``read`` (the ones the reader read, in
    :func:`umlcore.reader.component_centres`' order) has voxels in ``written`` (the labelmap the predictor wrote)."""
    components, found = largest_components(read, count)
    return [bool((written[components == cid] > 0).any()) for cid, *_ in found]


def redrawn_sizes(components: list[tuple[int, int, float, float]], drawn: np.ndarray,
                  written: np.ndarray) -> list[tuple[int, int, float, float]]:
    """The read ``components`` (``(voxels, slice, y, x)`` of the largest components of ``drawn``, in
    :func:`umlcore.reader.component_centres`' order) with ``voxels`` counted in ``written`` instead: the voxels of
    the components of ``written`` that overlap each one (the refiner redraws components, it does not move them)."""
    before, found = largest_components(drawn, len(components))
    after = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray((written > 0).astype(np.uint8)), False))
    sizes = np.bincount(after.ravel())
    out = []
    for (cid, *_), (_, z, y, x) in zip(found, components):
        ids = np.setdiff1d(np.unique(after[before == cid]), [0])
        out.append((int(sizes[ids].sum()), z, y, x))
    return out


#: The mirrorings (dims of a ``(B, C, H, W)`` batch) of each test-time augmentation rule, identity first.
_VIEWS: dict[str, tuple[tuple[int, ...], ...]] = {"none": ((),), "flip_w": ((), (3,)), "flip_hw": ((), (3,), (2,), (2, 3))}


def forward_views(model: torch.nn.Module, x: torch.Tensor, mode: str = "none") -> tuple[torch.Tensor, torch.Tensor]:
    """The network's segmentation and class Dirichlet parameters, averaged over mirrored views of the slices.

    Each view is the batch mirrored along the dims of the rule (none; W; W, H and both), run through the network,
    and its segmentation mirrored back; the views' alphas (evidence + 1) are averaged, so the result is again a
    Dirichlet whose uncertainty ``K / S`` is that of the mean evidence.

    Args:
        model: A :class:`~umlcore.network.UMLNet` (anything returning its output type).
        x: ``(B, C, H, W)`` input slices (padded as the network needs).
        mode: One of ``"none"`` (one pass, the network's own output), ``"flip_w"`` (2 views), ``"flip_hw"`` (4).

    Returns:
        ``seg_alpha`` ``(B, K_seg, H, W)`` and ``cls_alpha`` ``(B, K_cls)``.
    """
    if mode not in _VIEWS:
        raise ValueError(f"mode must be one of {list(NETWORK_TTA_MODES)}, got {mode!r}")
    seg, cls = 0.0, 0.0
    views = _VIEWS[mode]
    for dims in views:
        out = model(torch.flip(x, dims) if dims else x)
        seg = seg + (torch.flip(out.seg_alpha, dims) if dims else out.seg_alpha)
        cls = cls + out.cls_alpha
    return seg / len(views), cls / len(views)


def resolve_device(device: DeviceName) -> torch.device:
    """``auto`` -> CUDA if available else CPU; ``cuda`` without a GPU is refused with a fix."""
    if device not in ("auto", "cpu", "cuda"):
        raise UMLInputError(f"unknown device {device!r}: choose auto, cpu or cuda")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UMLInputError("device cuda was asked for but no CUDA GPU is available to PyTorch: use --device cpu or auto")
    return torch.device(device)


@contextlib.contextmanager
def strict_fp32():
    """cuDNN convolutions in IEEE fp32 instead of TF32 (10-bit mantissa) for the block; restored afterwards.

    The predictor's ``fp32`` precision on CUDA, so that a GPU gives the CPU's outputs (the cards' calibrations and
    thresholds were fitted in fp32). No effect on the CPU.
    """
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = saved


def _noop_progress(stage: str, fraction: float, message: str) -> None:
    return None


class Predictor:
    """Runs a loaded model bundle on volumes, slice by slice.

    Args:
        bundle: A verified :class:`~umlcore.bundle.ModelBundle` (``load_bundle``). Its model is moved to the
            chosen device (and to the CPU if CUDA runs out of memory).
        device: ``auto`` (CUDA if available, else CPU), ``cpu`` or ``cuda``.
        batch_size: Slices per forward pass (>= 1).
        precision: ``fp32`` (default): full float32 on every device, TF32 convolutions off on CUDA, so a GPU
            reproduces the CPU's outputs (the calibration and thresholds of a card were fitted in fp32).
            ``mixed``: bf16 (fp16 where bf16 is missing) autocast on CUDA, the CPU stays fp32; on the shipped
            model it changed 14 of 100 test cases' opinions by more than 0.01 and moved some components
            across the card's uncertainty filter (docs/model.md).

    Raises:
        UMLInputError: a bad device, batch size or precision.
    """

    def __init__(self, bundle: ModelBundle, device: DeviceName = "auto", batch_size: int = 8,
                 precision: Precision = "fp32") -> None:
        if not isinstance(bundle, ModelBundle):
            raise UMLInputError(f"Predictor needs a ModelBundle from umlcore.load_bundle, got {type(bundle).__name__}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise UMLInputError(f"batch size must be a positive integer, got {batch_size!r}: use e.g. 8 (1 for the least memory)")
        if bundle.card.architecture.num_seg_labels > 256:
            raise UMLInputError("the bundle has more than 256 segmentation labels, which a uint8 labelmap cannot hold")
        self.bundle = bundle
        self.card = bundle.card
        if precision not in ("fp32", "mixed"):
            raise UMLInputError(f"unknown precision {precision!r}: choose fp32 (exact, the default) or mixed (bf16 on CUDA)")
        self.batch_size = int(batch_size)
        self.precision = precision
        self._device = resolve_device(device)
        self.bundle.model.eval().to(self._device)
        for extra in (self.bundle.reader, self.bundle.refiner):
            if extra is not None:
                extra.eval().to(self._device)

    @property
    def device(self) -> str:
        """The device now in use: ``"cpu"`` or ``"cuda"``."""
        return self._device.type

    # ------------------------------------------------------------------------------------------ inputs

    def channel_volumes(self, volumes: Union[sitk.Image, Sequence[sitk.Image]]) -> tuple[list[sitk.Image], list[int]]:
        """Validate ``volumes`` against the card and map them to the network's channels.

        Args:
            volumes: One 3D volume, one 4D image (split along t), or a list of 3D volumes on one grid.

        Returns:
            ``(channels, source)``: one 3D image per network channel and, per channel, the index of the
            input volume it came from.

        Raises:
            UMLInputError: a wrong number of volumes, volumes off one grid, slices smaller than 8x8, or any
                :func:`umlcore.io.check_volume` problem.
        """
        if isinstance(volumes, sitk.Image):
            volumes = split_4d(volumes) if volumes.GetDimension() == 4 else [volumes]
        volumes = list(volumes)
        if not volumes or not all(isinstance(v, sitk.Image) for v in volumes):
            raise UMLInputError("volumes must be a SimpleITK image or a non-empty list of them (read them with umlcore.io.read_case)")
        spec = self.card.input
        n_channels = len(spec.channels)
        accepted = [n_channels]
        if spec.missing_channels == "replicate" and spec.min_channels <= 1 and n_channels > 1:
            accepted.insert(0, 1)
        if len(volumes) not in accepted:
            ways = " or ".join(
                f"1 (replicated into all {n_channels} channels)" if a == 1 and n_channels > 1 else f"{a} ({', '.join(spec.channels)})"
                for a in accepted
            )
            raise UMLInputError(
                f"got {len(volumes)} volumes for one case but model {self.card.id!r} takes {ways}: "
                "give that many phases (joined with commas on the command line)"
            )
        for i, v in enumerate(volumes):
            check_volume(v, f"volume {i}")
        check_same_grid(volumes)
        axis = slice_axis_index(volumes[0].GetDirection(), spec.slicing_axis)
        w_axis, h_axis = inplane_axes(axis)
        size = volumes[0].GetSize()
        if min(size[w_axis], size[h_axis]) < MIN_INPLANE_SIZE:
            raise UMLInputError(
                f"{spec.slicing_axis} slices of this volume are {size[w_axis]}x{size[h_axis]} voxels, smaller than "
                f"{MIN_INPLANE_SIZE}x{MIN_INPLANE_SIZE}: give a volume with larger {spec.slicing_axis} slices"
            )
        source = [0] * n_channels if len(volumes) == 1 else list(range(n_channels))
        return [volumes[s] for s in source], source

    # ------------------------------------------------------------------------------------------ inference

    def _autocast(self):
        """The numeric context of a forward pass: nothing on the CPU; on CUDA strict fp32 or autocast."""
        if self._device.type != "cuda":
            return contextlib.nullcontext()
        if self.precision == "fp32":
            return strict_fp32()
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast(device_type="cuda", dtype=dtype)

    def _forward(self, batch: np.ndarray, net_hw: tuple[int, int], views: str = "none") -> tuple[np.ndarray, ...]:
        """One batch ``(b, C, H, W)`` -> labels, uncertainty, foreground probability ``(b, H, W)``, cls alpha ``(b, Kc)``;
        ``views``: the test-time augmentation rule (:func:`forward_views`)."""
        multiple = self.card.architecture.pad_multiple
        with torch.inference_mode():
            x = torch.from_numpy(batch).to(self._device)
            hw = tuple(x.shape[-2:])
            x = pad_to_multiple(resize_slices(x, net_hw), multiple)
            with self._autocast():
                seg_alpha, cls_alpha = forward_views(self.bundle.model, x, views)
            alpha = resize_slices(crop_to(seg_alpha.float(), net_hw), hw)
            alpha = alpha.clamp_min(1.0)  # bilinear resize keeps alpha >= 1 up to rounding
            strength = alpha.sum(dim=1)
            labels = alpha.argmax(dim=1).to(torch.uint8)
            unc = (alpha.shape[1] / strength).clamp(0.0, 1.0)
            fg = (1.0 - alpha[:, 0] / strength).clamp(0.0, 1.0)
            cls_alpha = cls_alpha.float().clamp_min(1.0)
            return (
                labels.cpu().numpy(),
                unc.cpu().numpy().astype(np.float32),
                fg.cpu().numpy().astype(np.float32),
                cls_alpha.cpu().numpy().astype(np.float64),
            )

    def _fall_back(self, batch_size: int, report: ProgressCallback, fraction: float) -> int:
        """After an out-of-memory error: a halved batch, or batch 1 on the CPU once CUDA cannot go lower."""
        if self._device.type == "cuda":
            torch.cuda.empty_cache()
        if batch_size > 1:
            report("inference", fraction, f"out of memory: retrying with batch size {batch_size // 2}")
            return batch_size // 2
        if self._device.type == "cuda":
            self._device = torch.device("cpu")
            self.bundle.model.to(self._device)
            if self.bundle.reader is not None:
                self.bundle.reader.to(self._device)
            report("inference", fraction, "CUDA out of memory even with batch size 1: continuing on the CPU")
            return 1
        raise UMLError("out of memory on the CPU even with batch size 1: close other programs or give a smaller volume")

    # ------------------------------------------------------------------------------------------ predict

    def predict(
        self,
        volumes: Union[sitk.Image, Sequence[sitk.Image]],
        progress: Optional[ProgressCallback] = None,
        cancel: Optional[CancelCheck] = None,
        case_id: str = "case",
    ) -> Prediction:
        """Segment one case and give its case-level opinion.

        Args:
            volumes: One 3D volume (replicated into every channel if the card allows), one 4D image, or one
                3D volume per channel, all on one voxel grid (``umlcore.io.read_case`` reads them).
            progress: ``progress(stage, fraction, message)`` with a non-decreasing fraction in [0, 1].
            cancel: Checked before preprocessing and before every batch; returning True raises
                :class:`~umlcore.errors.CancelledError`.
            case_id: Name of the case in the summary.

        Returns:
            :class:`Prediction` (images on the input grid; summary per ``docs/summary-schema.md``).

        Raises:
            UMLInputError: inputs the model cannot take (see :meth:`channel_volumes`).
            CancelledError: ``cancel()`` returned True.
        """
        report = progress or _noop_progress
        is_cancelled = cancel or (lambda: False)
        t0 = time.perf_counter()
        if is_cancelled():
            raise CancelledError("cancelled before preprocessing")
        card, spec = self.card, self.card.input
        report("preprocess", 0.0, "checking and normalising the input volumes")
        channels, source = self.channel_volumes(volumes)
        single_volume = len(set(source)) < len(source)  # one volume replicated into every channel
        ref = channels[0]  # the input grid: every output lies on it
        if spec.motion_reference is not None and not single_volume:
            report("preprocess", 0.02, f"aligning the phases to the {spec.motion_correction.reference} phase "
                                       "(motion correction)")
        channels, alignment = self._align(channels, single_volume)
        # the card's test-time augmentation reads multi-phase cases; one volume is read once, as its calibration was fitted
        views = "none" if single_volume else card.test_time_augmentation
        axis = slice_axis_index(ref.GetDirection(), spec.slicing_axis)
        normalised: dict[int, np.ndarray] = {}
        for s in source:
            if s not in normalised:
                array = sitk.GetArrayFromImage(channels[source.index(s)]).astype(np.float32, copy=False)
                normalised[s] = to_slices(normalize(array, spec.normalization), axis)
        stack = np.ascontiguousarray(np.stack([normalised[s] for s in source], axis=1))  # (S, C, H, W)
        n_slices, _, height, width = stack.shape
        net_hw = (height, width)
        if spec.target_spacing is not None:
            w_axis, h_axis = inplane_axes(axis)
            spacing = ref.GetSpacing()
            net_hw = resized_shape((height, width), (spacing[h_axis], spacing[w_axis]), (spec.target_spacing[1], spec.target_spacing[0]))
            if min(net_hw) < MIN_INPLANE_SIZE:
                raise UMLInputError(
                    f"after resampling to {spec.target_spacing} mm the slices are {net_hw[1]}x{net_hw[0]} voxels, smaller than "
                    f"{MIN_INPLANE_SIZE}x{MIN_INPLANE_SIZE}: give a volume that covers a larger field of view"
                )
        t1 = time.perf_counter()
        report("preprocess", _PRE_END, f"{n_slices} {spec.slicing_axis} slices of {width}x{height} voxels")

        labels = np.empty((n_slices, height, width), dtype=np.uint8)
        unc = np.empty((n_slices, height, width), dtype=np.float32)
        fg = np.empty((n_slices, height, width), dtype=np.float32)
        cls_alpha = np.empty((n_slices, card.architecture.num_classes), dtype=np.float64)
        done, batch_size = 0, self.batch_size
        while done < n_slices:
            fraction = _PRE_END + (_INFER_END - _PRE_END) * done / n_slices
            if is_cancelled():
                raise CancelledError(f"cancelled after {done} of {n_slices} slices")
            end = min(done + batch_size, n_slices)
            try:
                out = self._forward(with_context(stack, done, end, spec.context_slices), net_hw, views)
            except torch.OutOfMemoryError:
                batch_size = self._fall_back(batch_size, report, fraction)
                continue
            labels[done:end], unc[done:end], fg[done:end], cls_alpha[done:end] = out
            done = end
            report("inference", _PRE_END + (_INFER_END - _PRE_END) * done / n_slices, f"slice {done} of {n_slices}")
        t2 = time.perf_counter()

        report("postprocess", _INFER_END, "building the outputs and the case summary")
        removed = 0
        raw = labels
        if card.component_max_uncertainty is not None:
            labels, removed = remove_uncertain_components(labels, unc, card.component_max_uncertainty)
        w_axis, h_axis = inplane_axes(axis)
        spacing = ref.GetSpacing()
        spacing_hw = (spacing[h_axis], spacing[w_axis])
        verified = self._verify_segmentation(stack, raw, spacing_hw, single_volume)  # before the reading: see evaluate
        segmentation = labels if verified is None else verified[0]
        checked = verified is not None and card.reader.opinion_reads == "checked"
        reading = self._read_lesions(stack, segmentation if checked else labels, spacing_hw, single_volume)
        if verified is not None:
            removed = verified[1]
            if reading is not None and reading["components"] and not checked:
                reading["in_labelmap"] = in_labelmap(labels, segmentation, len(reading["components"]))
        drawn = segmentation
        segmentation, refined = self._refine(stack, fg, drawn, single_volume)
        if refined and reading is not None and reading["components"]:
            reading["components"] = redrawn_sizes(reading["components"], drawn, segmentation)
        images = []
        for array in (segmentation, unc, fg):
            image = sitk.GetImageFromArray(np.ascontiguousarray(from_slices(array, axis)))
            image.CopyInformation(ref)
            images.append(image)
        summary = self._summary(case_id, ref, axis, source, single_volume, labels, unc, cls_alpha, reading,
                                segmentation, views)
        summary["motion_correction"] = self._motion_summary(single_volume, alignment)
        summary["postprocessing"] = {"component_max_uncertainty": card.component_max_uncertainty,
                                     "segmentation_min_lesion": None if verified is None else
                                     card.reader.segmentation_min_lesion,
                                     "components_removed": removed, "components_refined": refined}
        t3 = time.perf_counter()
        summary["timings_s"] = {
            "read": 0.0,
            "preprocess": t1 - t0,
            "inference": t2 - t1,
            "postprocess": t3 - t2,
            "total": t3 - t0,
        }
        report("postprocess", 1.0, "done")
        return Prediction(labelmap=images[0], uncertainty=images[1], probability=images[2], summary=summary)

    def _align(self, channels: list[sitk.Image],
               single_volume: bool) -> tuple[list[sitk.Image], Optional[list[PhaseAlignment]]]:
        """The card's motion correction of a multi-phase case's channels; ``None`` where it does not apply."""
        spec = self.card.input
        if spec.motion_reference is None or single_volume:
            return channels, None
        return align_phases(channels, spec.motion_reference, spec.motion_correction.max_shift_mm)

    def _motion_summary(self, single_volume: bool, alignment: Optional[list[PhaseAlignment]]) -> dict:
        """The summary's ``motion_correction`` (docs/summary-schema.md)."""
        spec = self.card.input
        mc = spec.motion_correction
        out = {"mode": mc.mode, "reference": None if mc.mode == "none" else mc.reference, "phases": [],
               "reason": None}
        if mc.mode != "none" and single_volume:
            out["reason"] = "one volume was given: nothing to align"
        for name, a in zip(spec.channels, alignment or []):
            if name != mc.reference:
                out["phases"].append({"channel": name, "applied": a.applied, "reason": a.reason,
                                      "shift_mm": None if a.shift_mm is None else [float(v) for v in a.shift_mm]})
        return out

    def _verify_segmentation(self, stack: np.ndarray, labels: np.ndarray, spacing_hw: tuple[float, float],
                             single_volume: bool) -> Optional[tuple[np.ndarray, int]]:
        """The reader's check of the unfiltered ``labels (S, H, W)`` (card field ``reader.segmentation_min_lesion``).

        Returns:
            ``None`` when it does not apply (no reader, no threshold on the card, or one volume), else the labelmap
            keeping those of the ``segmentation_max_components`` largest components whose ``lesion`` probability
            is at least the threshold, and how many components it removed.
        """
        cfg = self.card.reader
        if cfg is None or self.bundle.reader is None or cfg.segmentation_min_lesion is None or single_volume:
            return None
        components, found = largest_components(labels, cfg.segmentation_max_components)
        if not found:
            return labels, 0
        p = self._read_at(stack, [(z, y, x) for *_, z, y, x in found], spacing_hw)
        keep = [found[i][0] for i in range(len(found)) if p[i, 0] >= cfg.segmentation_min_lesion]
        verified = np.where(np.isin(components, keep), labels, 0).astype(labels.dtype)
        return verified, int(components.max()) - len(keep)

    def _refine(self, stack: np.ndarray, fg: np.ndarray, labels: np.ndarray,
                single_volume: bool) -> tuple[np.ndarray, Optional[int]]:
        """The refiner's redrawing of ``labels (S, H, W)`` (:func:`umlcore.refiner.refine_labels`) and how many
        components it redrew; ``labels`` and ``None`` where it does not apply (no refiner, or one volume)."""
        if self.bundle.refiner is None or single_volume:
            return labels, None
        with strict_fp32() if self._device.type == "cuda" else contextlib.nullcontext():
            return refine_labels(self.bundle.refiner, self.card.refiner, stack, fg, labels, self._device)

    def _read_lesions(self, stack: np.ndarray, labels: np.ndarray, spacing_hw: tuple[float, float],
                      single_volume: bool) -> Optional[dict]:
        """The lesion reader on the largest components of ``labels (S, H, W)``, from ``stack (S, C, H, W)``.

        Returns:
            ``None`` when the card has no reader, else ``{"components": [(voxels, z, y, x), ...], "p": (N, 3)
            probabilities, "score": the largest suspicion or None, "reason": why it was not applied or None}``.
        """
        cfg = self.card.reader
        if cfg is None or self.bundle.reader is None:
            return None
        reading = {"components": [], "p": np.zeros((0, len(READER_TARGETS))), "score": None, "reason": None}
        if single_volume:
            reading["reason"] = "one volume was given: the reader needs every phase (kinetics); the network's opinion stands"
            return reading
        found = component_centres(labels, cfg.max_components)
        if not found:
            reading["reason"] = ("nothing was segmented: the stacked rule reads the network's opinion alone"
                                 if cfg.fusion == "stacked" else "nothing was segmented: the network's opinion stands")
            return reading
        p = self._read_at(stack, [(z, y, x) for _, z, y, x in found], spacing_hw)
        reading.update(components=found, p=p, score=float(suspicion(p).max()))
        return reading

    def _read_at(self, stack: np.ndarray, centres: list[tuple[int, float, float]],
                 spacing_hw: tuple[float, float]) -> np.ndarray:
        """The reader's ``(N, 3)`` float64 probabilities of the patches of ``stack (S, C, H, W)`` at ``centres``
        ``(slice, y, x)``, cut and read as the card says."""
        cfg = self.card.reader
        channels = stack.transpose(1, 0, 2, 3)  # (C, S, H, W)
        patches = np.stack([cut_patch(channels, z, y, x, spacing_hw, cfg.patch_size, cfg.context_slices, cfg.pixel_mm)
                            for z, y, x in centres])
        with torch.inference_mode(), (strict_fp32() if self._device.type == "cuda" else contextlib.nullcontext()):
            return read_patches(self.bundle.reader, torch.from_numpy(patches).to(self._device),
                                cfg.test_time_augmentation).cpu().numpy().astype(np.float64)

    def _summary(
        self,
        case_id: str,
        ref: sitk.Image,
        axis: int,
        source: list[int],
        single_volume: bool,
        labels: np.ndarray,
        unc: np.ndarray,
        cls_alpha: np.ndarray,
        reading: Optional[dict] = None,
        segmentation: Optional[np.ndarray] = None,
        views: str = "none",
    ) -> dict:
        """The summary dict; ``labels`` is the uncertainty-filtered labelmap (its lesion voxels weigh the network's
        slices), ``segmentation`` the one written (``labels`` when ``None``), ``views`` the test-time augmentation
        rule the network read the slices with."""
        card = self.card
        segmentation = labels if segmentation is None else segmentation
        lesion = (labels > 0).reshape(labels.shape[0], -1).sum(axis=1)
        case_alpha = fuse_slice_opinions(cls_alpha, lesion)
        network_strength = float(case_alpha.sum())
        network_probs = case_alpha / network_strength
        if reading is not None and card.reader.fusion == "stacked" and not single_volume:
            # fitted on cases where nothing was segmented too (the reader's terms then 0), so applied to them as well
            top = None if reading["score"] is None else most_suspicious(reading["p"])
            case_alpha = stack_reader_opinion(case_alpha, top, card.reader.stacking, card.positive_class)
        elif reading is not None and reading["score"] is not None:
            case_alpha = fuse_reader_opinion(case_alpha, reading["score"], card.reader.weight, card.positive_class,
                                             card.reader.fusion)
        calibration_name, calibration = card.calibration_for(single_volume=single_volume)
        if calibration is not None:
            # "evidence", "stacked": the calibrated probability gets the network's strength, raised as far as it
            # needs (not for one volume, which the reader does not read: its calibration was fitted keeping the
            # strength)
            adds_evidence = (card.reader is not None and card.reader.fusion in ("evidence", "stacked")
                             and not single_volume)
            case_alpha = calibrate_case_alpha(case_alpha, calibration["slope"], calibration["intercept"],
                                              card.positive_class, network_strength if adds_evidence else None)
        strength = case_alpha.sum()
        probs = case_alpha / strength
        belief = (case_alpha - 1.0) / strength
        case_u = float(len(case_alpha) / strength)
        predicted = int(np.argmax(probs))
        voxel_ml = float(np.prod(ref.GetSpacing())) / 1000.0
        reader_summary, lesions = None, []
        if reading is not None:
            reader_summary = {"applied": reading["score"] is not None, "reason": reading["reason"],
                              "score": reading["score"], "weight": float(card.reader.weight),
                              "fusion": READER_FUSION_RULES[card.reader.fusion],
                              "network_probabilities": [float(v) for v in network_probs],
                              "network_uncertainty": float(len(network_probs) / network_strength)}
            numpy_axis = 2 - axis  # the slice axis in the (z, y, x) array; H and W are the other two, in order
            rest = [a for a in range(3) if a != numpy_axis]
            for rank, ((voxels, z, y, x), p) in enumerate(zip(reading["components"], reading["p"])):
                index = [0.0] * 3
                index[numpy_axis], index[rest[0]], index[rest[1]] = float(z), y, x
                ijk = index[::-1]
                lesions.append({
                    "rank": rank,
                    "voxel_count": int(voxels),
                    "volume_ml": int(voxels) * voxel_ml,
                    "centre_index": [float(v) for v in ijk],
                    "centre_lps": [float(v) for v in ref.TransformContinuousIndexToPhysicalPoint(ijk)],
                    "probabilities": {t: float(v) for t, v in zip(READER_TARGETS, p)},
                    "suspicion": float(suspicion(p)),
                    "in_labelmap": bool(reading.get("in_labelmap", [True] * len(reading["p"]))[rank]),
                })
        segments = []
        for seg in card.segments:
            mask = segmentation == seg.label
            count = int(mask.sum())
            segments.append({
                "label": int(seg.label),
                "name": seg.name,
                "color": [float(c) for c in seg.color],
                "voxel_count": count,
                "volume_ml": count * voxel_ml,
                "mean_uncertainty": float(unc[mask].mean(dtype=np.float64)) if count else None,
            })
        slice_strength = cls_alpha.sum(axis=1)
        slices = [
            {
                "index": s,
                "lesion_voxels": int(lesion[s]),
                "probabilities": [float(v) for v in cls_alpha[s] / slice_strength[s]],
                "uncertainty": float(cls_alpha.shape[1] / slice_strength[s]),
            }
            for s in range(labels.shape[0])
        ]
        return {
            "schema_version": SUMMARY_SCHEMA_VERSION,
            "case_id": case_id,
            "inputs": [{"channel": name, "volume": s} for name, s in zip(card.input.channels, source)],
            "model": {"id": card.id, "version": card.version, "sha256": self.bundle.sha256, "path": str(self.bundle.path)},
            "geometry": geometry(ref),
            "slicing": {"axis": card.input.slicing_axis, "index_axis": axis, "count": int(labels.shape[0]),
                        "context_slices": card.input.context_slices},
            "device": self.device,
            "precision": self.precision,
            "test_time_augmentation": views,
            "timings_s": {},
            "classification": {
                "classes": list(card.classes),
                "probabilities": [float(v) for v in probs],
                "belief": [float(v) for v in belief],
                "uncertainty": case_u,
                "predicted_index": predicted,
                "predicted_class": card.classes[predicted],
                "positive_class": card.classes[card.positive_class],
                "positive_probability": float(probs[card.positive_class]),
                "verdict": "review" if case_u > card.review_uncertainty else "reliable",
                "fusion": FUSION_RULE,
                "calibration": calibration_name,
                "reader": reader_summary,
            },
            "lesions": lesions,
            "segments": segments,
            "slices": slices,
            "outputs": {},
        }
