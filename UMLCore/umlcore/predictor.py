"""From volumes to results: the slice-wise UML predictor (``docs/cli.md`` and ``docs/summary-schema.md`` for what it
writes).

:meth:`Predictor.predict` is a short list of named steps:

1. **channels** -- the input volumes as the card's channels: one volume per channel, or one volume replicated into
   every channel (``input.missing_channels == "replicate"``), all on one voxel grid.
2. **align** -- with the card's ``input.motion_correction`` ``"translation"``, the other phases of a multi-phase case
   are moved onto the reference phase (:func:`umlcore.registration.align_phases`).
3. **normalise** -- the index axis closest to the card's slicing axis becomes the slice axis (a pure permutation,
   undone exactly at the end); each channel is normalised over its volume as declared.
4. **infer** -- slices run through the network in batches (``torch.inference_mode``; strict fp32 by default, so a
   GPU gives the CPU's results; resampled in-plane if the card asks and zero-padded to the network's multiple; a
   2.5D card gives each slice its neighbours as extra channels); the cancel check runs before every batch; on CUDA
   out-of-memory the batch is halved down to 1, then the run goes on on the CPU.
5. **postprocess** -- components of the labelmap whose mean uncertainty exceeds the card's
   ``component_max_uncertainty`` are removed; for a multi-phase case of a card with a lesion reader, the reader
   checks the network's labelmap instead and reads the lesions it keeps (:func:`umlcore.reader.check_and_read`).
6. **opinion** -- the slices' class Dirichlets pooled, weighted by the lesion voxels of the uncertainty-filtered
   labelmap, then the reader's stacked rule or the card's calibration (:func:`umlcore.fusion.case_opinion`).
7. **outputs** -- labelmap, uncertainty ``K / S`` of the final segmentation Dirichlet and foreground probability on
   the input voxel grid, and the case summary (:func:`umlcore.summary.build_summary`).

``trace(step, value)``, if given, receives the intermediate results (:data:`TRACE_STEPS`), so evaluation and
training code read them without reaching into the predictor.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional, Sequence, Union

import numpy as np
import SimpleITK as sitk
import torch

from .bundle import ModelBundle
from .components import remove_uncertain_components
from .errors import CancelledError, UMLError, UMLInputError
from .fusion import case_opinion
from .io import MIN_INPLANE_SIZE, check_colours, check_same_grid, check_volume, split_4d
from .pictures import is_picture_image, split_picture
from .preprocess import (crop_to, from_slices, inplane_axes, normalize, pad_to_multiple, resize_slices,
                         resized_shape, slice_axis_index, to_slices, with_context)
from .reader import Reading, check_and_read
from .registration import align_phases
from .inputcheck import input_reasons
from .resources import memory_limit_bytes, plan_batch
from .summary import CaseRecord, build_summary

__all__ = ["DeviceName", "Precision", "ProgressCallback", "CancelCheck", "TraceCallback", "TRACE_STEPS",
           "NetworkSlices", "Prediction", "Predictor", "resolve_device", "strict_fp32"]

DeviceName = Literal["auto", "cpu", "cuda", "mps"]
BatchSize = Union[int, Literal["auto"]]
#: The batch ``batch_size="auto"`` takes per device type (docs/performance.md has the measurements).
AUTO_BATCH = {"cpu": 1, "cuda": 8, "mps": 8}
Precision = Literal["fp32", "mixed"]
#: ``progress(stage, fraction, message)``: stage is ``preprocess`` | ``inference`` | ``postprocess``; the
#: fraction (0..1) runs over the whole prediction and never decreases.
ProgressCallback = Callable[[str, float, str], None]
#: ``cancel() -> True`` stops the run with :class:`~umlcore.errors.CancelledError`.
CancelCheck = Callable[[], bool]
#: ``trace(step, value)``: receives the intermediate results named in :data:`TRACE_STEPS`.
TraceCallback = Callable[[str, Any], None]
#: What ``trace`` receives, in order (arrays in slice order ``(S, ...)``, never to be modified):
#: ``"stack"`` the normalised (and aligned) channels ``(S, C, H, W)``; ``"network"`` :class:`NetworkSlices`;
#: ``"filtered"`` the labelmap after the uncertainty filter; ``"reading"`` the lesion reader's
#: :class:`~umlcore.reader.Reading` (only where it read: a multi-phase case of a card with a reader);
#: ``"opinion"`` the :class:`~umlcore.fusion.CaseOpinion`.
TRACE_STEPS = ("stack", "network", "filtered", "reading", "opinion")

# Share of the whole prediction taken by each stage (for the progress fraction).
_PRE_END, _INFER_END = 0.1, 0.9


@dataclass
class NetworkSlices:
    """The network's outputs for every slice, in slice order.

    Attributes:
        labels: ``(S, H, W)`` uint8 argmax of the final segmentation Dirichlet.
        uncertainty: ``(S, H, W)`` float32 ``K / S`` of it, in [0, 1].
        foreground: ``(S, H, W)`` float32 ``1 - p_background``.
        cls_alpha: ``(S, K)`` float64 per-slice class Dirichlets.
    """

    labels: np.ndarray
    uncertainty: np.ndarray
    foreground: np.ndarray
    cls_alpha: np.ndarray


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
    probability: sitk.Image
    summary: dict


def resolve_device(device: DeviceName) -> torch.device:
    """``auto`` -> CUDA if available else CPU; ``cuda`` without a GPU, or ``mps`` (Apple silicon's GPU, only when
    asked for: its float32 kernels differ from the CPU's) without Metal, is refused with a fix."""
    if device not in ("auto", "cpu", "cuda", "mps"):
        raise UMLInputError(f"unknown device {device!r}: choose auto, cpu, cuda or mps")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UMLInputError("device cuda was asked for but no CUDA GPU is available to PyTorch: use --device cpu or auto")
    if device == "mps" and not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        raise UMLInputError("device mps was asked for but PyTorch has no Apple-silicon GPU (Metal) here: use --device cpu or auto")
    return torch.device(device)


@contextlib.contextmanager
def strict_fp32():
    """cuDNN convolutions in IEEE fp32 instead of TF32 for the block, restored afterwards: the predictor's ``fp32``
    precision on CUDA, so that a GPU gives the CPU's outputs (cards are fitted in fp32). No effect on the CPU."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = saved


def _ignore(*args: Any) -> None:
    return None


class Predictor:
    """Runs a loaded model bundle on volumes, slice by slice.

    Args:
        bundle: A verified :class:`~umlcore.bundle.ModelBundle` (``load_bundle``). Its networks are moved to the
            chosen device (and to the CPU if CUDA runs out of memory).
        device: ``auto`` (CUDA if available, else CPU), ``cpu`` or ``cuda``.
        batch_size: Slices per forward pass (>= 1), or ``"auto"`` (default): :data:`AUTO_BATCH` for the device --
            on the CPU one slice at a time, which is as fast as larger batches once the allocator keeps its blocks
            (:mod:`umlcore.allocator`) and takes the least memory; 8 on a GPU.
        precision: ``fp32`` (default): full float32 on every device, TF32 off on CUDA, so a GPU reproduces the
            CPU's outputs. ``mixed``: bf16 (fp16 where bf16 is missing) autocast on CUDA; the CPU stays fp32.
        max_memory_gb: The memory a prediction may take (default: 70 % of what is available when it starts): the
            batch is made smaller to fit, and a volume whose slices do not fit one at a time is refused
            (:mod:`umlcore.resources`).

    Raises:
        UMLInputError: a bad device, batch size, precision or memory limit.
    """

    def __init__(self, bundle: ModelBundle, device: DeviceName = "auto", batch_size: BatchSize = "auto",
                 precision: Precision = "fp32", max_memory_gb: Optional[float] = None) -> None:
        if not isinstance(bundle, ModelBundle):
            raise UMLInputError(f"Predictor needs a ModelBundle from umlcore.load_bundle, got {type(bundle).__name__}")
        if batch_size != "auto" and (isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer))
                                     or batch_size < 1):
            raise UMLInputError(f"batch size must be a positive integer or 'auto', got {batch_size!r}: use e.g. 8 "
                                "(1 for the least memory)")
        if bundle.card.architecture.num_seg_labels > 256:
            raise UMLInputError("the bundle has more than 256 segmentation labels, which a uint8 labelmap cannot hold")
        if precision not in ("fp32", "mixed"):
            raise UMLInputError(f"unknown precision {precision!r}: choose fp32 (exact, the default) or mixed (bf16 on CUDA)")
        memory_limit_bytes(max_memory_gb)  # refuses a bad limit now
        self.bundle = bundle
        self.card = bundle.card
        self._batch_size = batch_size if batch_size == "auto" else int(batch_size)
        self.precision = precision
        self.max_memory_gb = max_memory_gb
        self._move_to(resolve_device(device))

    @property
    def batch_size(self) -> int:
        """Slices per forward pass on the device now in use (``auto`` resolved by :data:`AUTO_BATCH`)."""
        return AUTO_BATCH.get(self._device.type, 8) if self._batch_size == "auto" else self._batch_size

    @property
    def device(self) -> str:
        """The device now in use: ``"cpu"``, ``"cuda"`` or ``"mps"``."""
        return self._device.type

    def _move_to(self, device: torch.device) -> None:
        """The network and the lesion reader on ``device`` (together: they are never split across devices)."""
        self._device = device
        for net in (self.bundle.model, self.bundle.reader):
            if net is not None:
                net.eval().to(device)

    # ------------------------------------------------------------------------------------------ inputs

    def channel_volumes(self, volumes: Union[sitk.Image, Sequence[sitk.Image]]) -> tuple[list[sitk.Image], list[int]]:
        """``(channels, source)`` of :meth:`_channels` (the check a caller runs before predicting)."""
        return self._channels(volumes)[:2]

    def _channels(self, volumes: Union[sitk.Image, Sequence[sitk.Image]]) -> tuple[list[sitk.Image], list[int], list[str]]:
        """Validate ``volumes`` against the card and map them to the network's channels.

        Args:
            volumes: One 3D volume, one 4D image (split along t), one picture (a 2D image or a single-slice vector
                image, split into its colours: :func:`umlcore.pictures.split_picture`), or a list of 3D volumes on
                one grid.

        Returns:
            ``(channels, source, notes)``: one 3D image per network channel, per channel the index of the input
            volume it came from, and what was noticed (volumes that are all identical are read as one volume).

        Raises:
            UMLInputError: a picture for a volume model or a volume for a picture model, a wrong number of volumes,
                volumes off one grid, slices smaller than 8x8, or any :func:`umlcore.io.check_volume` problem.
        """
        if isinstance(volumes, sitk.Image) and is_picture_image(volumes):
            volumes = split_picture(volumes, "the picture")[0]
        elif isinstance(volumes, sitk.Image):
            volumes = split_4d(volumes) if volumes.GetDimension() == 4 else [volumes]
        volumes = list(volumes)
        if not volumes or not all(isinstance(v, sitk.Image) for v in volumes):
            raise UMLInputError("volumes must be a SimpleITK image or a non-empty list of them (read them with umlcore.io.read_case)")
        if self.card.input.kind == "picture":  # a flat colour (no blue at all) is read as zeros
            check_colours(volumes, [f"colour {i}" for i in range(len(volumes))])
        else:
            for i, v in enumerate(volumes):
                check_volume(v, f"volume {i}")
        self._check_kind(volumes[0].GetSize(), volumes[0].GetDirection())
        self._check_count(len(volumes))
        check_same_grid(volumes)
        spec = self.card.input
        n_channels = len(spec.channels)
        self._check_spacing(volumes[0])
        axis = slice_axis_index(volumes[0].GetDirection(), spec.slicing_axis)
        w_axis, h_axis = inplane_axes(axis)
        size = volumes[0].GetSize()
        if min(size[w_axis], size[h_axis]) < MIN_INPLANE_SIZE:
            raise UMLInputError(
                f"{spec.slicing_axis} slices of this volume are {size[w_axis]}x{size[h_axis]} voxels, smaller than "
                f"{MIN_INPLANE_SIZE}x{MIN_INPLANE_SIZE}: give a volume with larger {spec.slicing_axis} slices"
            )
        same = len(volumes) > 1 and all(np.array_equal(sitk.GetArrayViewFromImage(volumes[0]),
                                                       sitk.GetArrayViewFromImage(v)) for v in volumes[1:])
        source = [0] * n_channels if len(volumes) == 1 or same else list(range(n_channels))
        notes = [] if not same else [
            f"the picture's {len(volumes)} colours are identical (a grey picture): read as one grey picture"
            if spec.kind == "picture" else f"the {len(volumes)} volumes given are identical: read as one volume"]
        return [volumes[s] for s in source], source, notes

    def _accepted_counts(self) -> list[int]:
        """How many input volumes the card takes: one per channel, or one replicated into every channel."""
        spec = self.card.input
        n_channels = len(spec.channels)
        if spec.missing_channels == "replicate" and spec.min_channels <= 1 and n_channels > 1:
            return [1, n_channels]
        return [n_channels]

    def input_reasons(self, channels: Sequence[sitk.Image], source: Sequence[int]) -> list[str]:
        """Why the input volumes (``channels`` and ``source`` of :meth:`channel_volumes`) do not look like the
        model's training images (:mod:`umlcore.inputcheck`); empty when nothing was found."""
        return input_reasons(self.card, [channels[source.index(v)] for v in sorted(set(source))])

    def _check_count(self, count: int) -> None:
        """Refuse a number of volumes (phases, or a picture's colours) the card does not take."""
        spec, accepted = self.card.input, self._accepted_counts()
        if count in accepted:
            return
        n_channels, names = len(spec.channels), ", ".join(spec.channels)
        one = "a grey picture, replicated" if spec.kind == "picture" else "replicated"
        ways = " or ".join(f"1 ({one} into all {n_channels} channels)" if a == 1 and n_channels > 1 else f"{a} ({names})"
                           for a in accepted)
        if spec.kind == "picture":
            raise UMLInputError(f"got a picture of {count} channel(s) but model {self.card.id!r} takes {ways}: give a "
                                "picture with those channels (RGB for red, green, blue; an alpha channel is dropped)")
        raise UMLInputError(f"got {count} volumes for one case but model {self.card.id!r} takes {ways}: "
                            "give that many phases (joined with commas on the command line)")

    def _check_kind(self, size: Sequence[int], direction: Sequence[float]) -> None:
        """Refuse a 3D volume for a picture model, and a picture (one slice) for a volume model."""
        spec = self.card.input
        axis = slice_axis_index(direction, spec.slicing_axis)
        w_axis, h_axis = inplane_axes(axis)
        channels = ", ".join(spec.channels)
        if spec.kind == "picture" and size[axis] > 1:
            raise UMLInputError(
                f"model {self.card.id!r} reads 2D pictures ({channels}), but got a 3D volume of "
                f"{'x'.join(str(int(v)) for v in size)} voxels: give a picture (PNG, JPEG, BMP, TIFF)")
        if spec.kind == "volume" and size[axis] == 1:
            raise UMLInputError(
                f"model {self.card.id!r} reads 3D volumes ({channels}), but got a 2D picture or single slice of "
                f"{size[w_axis]}x{size[h_axis]} pixels: give the whole volume, or a model made for pictures "
                "(uml models lists them)")

    def _check_spacing(self, image: sitk.Image) -> None:
        """Refuse a spacing outside the card's ``input.spacing_mm`` (a header in metres or microns, say)."""
        limits = self.card.input.spacing_mm
        spacing = image.GetSpacing()
        if limits is not None and not all(limits[0] <= v <= limits[1] for v in spacing):
            raise UMLInputError(
                f"the volume's voxel spacing {' x '.join(f'{v:g}' for v in spacing)} mm lies outside the "
                f"{limits[0]:g}-{limits[1]:g} mm of the scans model {self.card.id!r} reads: if the header is in "
                "metres or microns, fix its spacing; otherwise this is not a scan this model can read")

    def plan_batch(self, size: Sequence[int], direction: Sequence[float], spacing: Sequence[float]) -> int:
        """The batch a volume of this geometry is run with (at most ``batch_size``), known before its voxels are
        read (:func:`umlcore.resources.plan_batch`).

        Raises:
            UMLInputError: its slices do not fit the memory limit one at a time.
        """
        axis = slice_axis_index(direction, self.card.input.slicing_axis)
        w_axis, h_axis = inplane_axes(axis)
        hw = (int(size[h_axis]), int(size[w_axis]))
        return plan_batch(self.card, int(size[axis]), hw, self.batch_size, memory_limit_bytes(self.max_memory_gb),
                          "x".join(str(int(v)) for v in size), network_hw=self._network_size(spacing, axis, hw))

    # ------------------------------------------------------------------------------------------ inference

    def _numerics(self):
        """Strict fp32 on CUDA (TF32 off), nothing on the CPU."""
        return strict_fp32() if self._device.type == "cuda" else contextlib.nullcontext()

    def _autocast(self):
        """The numeric context of a forward pass: nothing on the CPU; on CUDA strict fp32 or autocast."""
        if self._device.type != "cuda" or self.precision == "fp32":
            return self._numerics()
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast(device_type="cuda", dtype=dtype)

    def _forward(self, batch: np.ndarray, net_hw: tuple[int, int]) -> tuple[np.ndarray, ...]:
        """One batch ``(b, C, H, W)`` -> labels, uncertainty, foreground probability ``(b, H, W)``, cls alpha ``(b, K)``."""
        with torch.inference_mode():
            x = torch.from_numpy(batch).to(self._device)
            hw = tuple(x.shape[-2:])
            x = pad_to_multiple(resize_slices(x, net_hw), self.card.architecture.pad_multiple)
            with self._autocast():
                out = self.bundle.model(x)
            alpha = resize_slices(crop_to(out.seg_alpha.float(), net_hw), hw)
            alpha = alpha.clamp_min(1.0)  # bilinear resize keeps alpha >= 1 up to rounding
            strength = alpha.sum(dim=1)
            labels = alpha.argmax(dim=1).to(torch.uint8)
            unc = (alpha.shape[1] / strength).clamp(0.0, 1.0)
            fg = (1.0 - alpha[:, 0] / strength).clamp(0.0, 1.0)
            cls_alpha = out.cls_alpha.float().clamp_min(1.0)
            return (labels.cpu().numpy(), unc.cpu().numpy().astype(np.float32), fg.cpu().numpy().astype(np.float32),
                    cls_alpha.cpu().numpy().astype(np.float64))

    def _fall_back(self, batch_size: int, report: ProgressCallback, fraction: float) -> int:
        """After an out-of-memory error: a halved batch, or batch 1 on the CPU once CUDA cannot go lower."""
        if self._device.type == "cuda":
            torch.cuda.empty_cache()
        if batch_size > 1:
            report("inference", fraction, f"out of memory: retrying with batch size {batch_size // 2}")
            return batch_size // 2
        if self._device.type == "cuda":
            self._move_to(torch.device("cpu"))
            report("inference", fraction, "CUDA out of memory even with batch size 1: continuing on the CPU")
            return 1
        raise UMLError("out of memory on the CPU even with batch size 1: close other programs or give a smaller volume")

    # ------------------------------------------------------------------------------------------ predict

    def predict(self, volumes: Union[sitk.Image, Sequence[sitk.Image]], progress: Optional[ProgressCallback] = None,
                cancel: Optional[CancelCheck] = None, case_id: str = "case",
                trace: Optional[TraceCallback] = None) -> Prediction:
        """Segment one case and give its case-level opinion.

        Args:
            volumes: One 3D volume (replicated into every channel if the card allows), one 4D image, or one 3D
                volume per channel, all on one voxel grid (``umlcore.io.read_case`` reads them).
            progress: ``progress(stage, fraction, message)`` with a non-decreasing fraction in [0, 1].
            cancel: Checked before preprocessing and before every batch; True raises
                :class:`~umlcore.errors.CancelledError`.
            case_id: Name of the case in the summary.
            trace: ``trace(step, value)`` receives the intermediate results (:data:`TRACE_STEPS`).

        Returns:
            :class:`Prediction` (images on the input grid; summary per ``docs/summary-schema.md``).

        Raises:
            UMLInputError: inputs the model cannot take (see :meth:`channel_volumes`).
            CancelledError: ``cancel()`` returned True.
        """
        report = _ignore if progress is None else progress
        cancel = (lambda: False) if cancel is None else cancel
        trace = _ignore if trace is None else trace
        t0 = time.perf_counter()
        if cancel():
            raise CancelledError("cancelled before preprocessing")
        report("preprocess", 0.0, "checking and normalising the input volumes")
        channels, source, notes = self._channels(volumes)
        reasons = self.input_reasons(channels, source)
        single_volume = len(set(source)) < len(source)  # one volume replicated into every channel
        reference = channels[0]  # the input grid: every output lies on it
        batch_size = self.plan_batch(reference.GetSize(), reference.GetDirection(), reference.GetSpacing())
        channels, alignment = self._align(channels, single_volume, report)
        axis = slice_axis_index(reference.GetDirection(), self.card.input.slicing_axis)
        stack = self._normalise(channels, source, axis)
        trace("stack", stack)
        t1 = time.perf_counter()
        network = self._infer(stack, self._network_size(reference.GetSpacing(), axis, stack.shape[-2:]), batch_size,
                              report, cancel)
        trace("network", network)
        t2 = time.perf_counter()
        report("postprocess", _INFER_END, "building the outputs and the case summary")
        filtered, removed = self._filter(network)
        trace("filtered", filtered)
        reading = self._check_and_read(stack, network.labels, reference, axis, single_volume)
        if reading is not None:
            trace("reading", reading)
        lesion_voxels = (filtered > 0).reshape(len(filtered), -1).sum(axis=1)
        opinion = case_opinion(self.card, network.cls_alpha, lesion_voxels, None if reading is None else reading.top,
                               single_volume)
        trace("opinion", opinion)
        written = filtered if reading is None else reading.checked
        images = [self._on_grid(a, reference, axis) for a in (written, network.uncertainty, network.foreground)]
        record = CaseRecord(case_id=case_id, reference=reference, axis=axis, source=source, input_check=notes,
                            input_reasons=reasons,
                            single_volume=single_volume, device=self.device, precision=self.precision,
                            threads=torch.get_num_threads(),
                            network=network, lesion_voxels=lesion_voxels, written=written, removed=removed if reading is None else reading.removed,
                            reading=reading, opinion=opinion, alignment=alignment,
                            timings={"read": 0.0, "preprocess": t1 - t0, "inference": t2 - t1,
                                     "postprocess": time.perf_counter() - t2})
        summary = build_summary(self.bundle, record)
        report("postprocess", 1.0, "done")
        return Prediction(labelmap=images[0], uncertainty=images[1], probability=images[2], summary=summary)

    # ------------------------------------------------------------------------------------------ the steps

    def _align(self, channels: list[sitk.Image], single_volume: bool, report: ProgressCallback):
        """The card's motion correction of a multi-phase case's channels; ``(channels, None)`` where it does not apply."""
        spec = self.card.input
        if spec.motion_reference is None or single_volume:
            return channels, None
        report("preprocess", 0.02, f"aligning the phases to the {spec.motion_correction.reference} phase (motion correction)")
        return align_phases(channels, spec.motion_reference, spec.motion_correction.max_shift_mm)

    def _normalise(self, channels: list[sitk.Image], source: list[int], axis: int) -> np.ndarray:
        """``(S, C, H, W)`` float32: each input volume normalised once, in slice order, one per channel."""
        normalised: dict[int, np.ndarray] = {}
        for s in source:
            if s not in normalised:
                array = sitk.GetArrayFromImage(channels[source.index(s)]).astype(np.float32, copy=False)
                normalised[s] = to_slices(normalize(array, self.card.input.normalization), axis)
        return np.ascontiguousarray(np.stack([normalised[s] for s in source], axis=1))

    def _network_size(self, spacing: Sequence[float], axis: int, hw: tuple[int, int]) -> tuple[int, int]:
        """The in-plane size ``(H, W)`` the network reads: the slices' own, the card's ``target_size``, or resampled
        to the card's ``target_spacing``."""
        spec = self.card.input
        if spec.target_size is not None:
            return tuple(spec.target_size)
        if spec.target_spacing is None:
            return tuple(hw)
        w_axis, h_axis = inplane_axes(axis)
        net_hw = resized_shape(tuple(hw), (spacing[h_axis], spacing[w_axis]), (spec.target_spacing[1], spec.target_spacing[0]))
        if min(net_hw) < MIN_INPLANE_SIZE:
            raise UMLInputError(
                f"after resampling to {spec.target_spacing} mm the slices are {net_hw[1]}x{net_hw[0]} voxels, smaller "
                f"than {MIN_INPLANE_SIZE}x{MIN_INPLANE_SIZE}: give a volume that covers a larger field of view")
        return net_hw

    def _infer(self, stack: np.ndarray, net_hw: tuple[int, int], batch_size: int, report: ProgressCallback,
               cancel: CancelCheck) -> NetworkSlices:
        """Every slice through the network, in batches, with the out-of-memory fallback."""
        n, _, h, w = stack.shape
        report("preprocess", _PRE_END, f"a picture of {w}x{h} pixels" if self.card.input.kind == "picture" else
               f"{n} {self.card.input.slicing_axis} slices of {w}x{h} voxels")
        out = NetworkSlices(np.empty((n, h, w), np.uint8), np.empty((n, h, w), np.float32),
                            np.empty((n, h, w), np.float32), np.empty((n, self.card.architecture.num_classes)))
        done = 0
        while done < n:
            fraction = _PRE_END + (_INFER_END - _PRE_END) * done / n
            if cancel():
                raise CancelledError(f"cancelled after {done} of {n} slices")
            end = min(done + batch_size, n)
            try:
                batch = self._forward(with_context(stack, done, end, self.card.input.context_slices), net_hw)
            except torch.OutOfMemoryError:
                batch_size = self._fall_back(batch_size, report, fraction)
                continue
            out.labels[done:end], out.uncertainty[done:end], out.foreground[done:end], out.cls_alpha[done:end] = batch
            done = end
            report("inference", _PRE_END + (_INFER_END - _PRE_END) * done / n, f"slice {done} of {n}")
        return out

    def _filter(self, network: NetworkSlices) -> tuple[np.ndarray, int]:
        """The labelmap without the components the card's uncertainty filter removes, and how many it removed."""
        if self.card.component_max_uncertainty is None:
            return network.labels, 0
        return remove_uncertain_components(network.labels, network.uncertainty, self.card.component_max_uncertainty)

    def _check_and_read(self, stack: np.ndarray, labels: np.ndarray, reference: sitk.Image, axis: int,
                        single_volume: bool) -> Optional[Reading]:
        """The lesion reader's check and reading of a multi-phase case; ``None`` without a reader or for one volume
        (the reader reads the kinetics between the phases)."""
        if self.bundle.reader is None or single_volume:
            return None
        w_axis, h_axis = inplane_axes(axis)
        spacing = reference.GetSpacing()
        with self._numerics():
            return check_and_read(self.bundle.reader, self.card.reader, stack, labels,
                                  (spacing[h_axis], spacing[w_axis]), self._device)

    @staticmethod
    def _on_grid(array: np.ndarray, reference: sitk.Image, axis: int) -> sitk.Image:
        """A slice-order array as an image on the input grid (the permutation undone)."""
        image = sitk.GetImageFromArray(np.ascontiguousarray(from_slices(array, axis)))
        image.CopyInformation(reference)
        return image
