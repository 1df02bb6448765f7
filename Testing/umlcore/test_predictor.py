"""umlcore.predictor and umlcore.preprocess: outputs on the input grid, channels, batching, progress, cancel."""

import contextlib
import dataclasses

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from umlcore.bundle import NETWORK_TTA_MODES, InputSpec, Normalization, load_bundle
from umlcore.errors import CancelledError, UMLError, UMLInputError
from umlcore.fusion import calibrate_case_alpha, fuse_slice_opinions
from umlcore.io import read_case, write_image_atomic
from umlcore.network import UMLOutput
from umlcore.predictor import Prediction, Predictor, forward_views, remove_uncertain_components, strict_fp32
from umlcore.preprocess import (
    crop_to,
    from_slices,
    inplane_axes,
    normalize,
    pad_to_multiple,
    resized_shape,
    slice_axis_index,
    to_slices,
    with_context,
)

SUMMARY_KEYS = {
    "schema_version", "case_id", "inputs", "model", "geometry", "slicing", "device", "precision",
    "test_time_augmentation", "timings_s", "motion_correction",
    "classification", "segments", "slices", "outputs", "postprocessing", "lesions",
}
CLASSIFICATION_KEYS = {
    "classes", "probabilities", "belief", "uncertainty", "predicted_index", "predicted_class", "positive_class",
    "positive_probability", "verdict", "fusion", "calibration", "reader",
}


def assert_on_grid(image, ref, atol=0.0):
    assert image.GetSize() == ref.GetSize()
    if atol == 0.0:
        assert image.GetSpacing() == ref.GetSpacing()
        assert image.GetOrigin() == ref.GetOrigin()
        assert image.GetDirection() == ref.GetDirection()
    else:
        np.testing.assert_allclose(image.GetSpacing(), ref.GetSpacing(), rtol=0, atol=atol)
        np.testing.assert_allclose(image.GetOrigin(), ref.GetOrigin(), rtol=0, atol=atol)
        np.testing.assert_allclose(image.GetDirection(), ref.GetDirection(), rtol=0, atol=atol)


@pytest.fixture(scope="module")
def predictor(tiny_bundle):
    return Predictor(tiny_bundle, device="cpu", batch_size=4)


@pytest.fixture(scope="module")
def base_prediction(predictor, make_volume):
    return predictor.predict(make_volume())


# ------------------------------------------------------------------------------------------- preprocess


def test_slice_axis_follows_the_direction_matrix(oblique_direction):
    assert slice_axis_index((1, 0, 0, 0, 1, 0, 0, 0, 1), "axial") == 2
    assert slice_axis_index((1, 0, 0, 0, 1, 0, 0, 0, 1), "coronal") == 1
    assert slice_axis_index((1, 0, 0, 0, 1, 0, 0, 0, 1), "sagittal") == 0
    assert slice_axis_index(oblique_direction, "axial") == 2
    # a sagittal acquisition: index axis 0 runs along S (column 0 = (0, 0, 1))
    assert slice_axis_index((0, 1, 0, 0, 0, 1, 1, 0, 0), "axial") == 0
    assert slice_axis_index((0, 1, 0, 0, 0, -1, -1, 0, 0), "axial") == 0  # also when it runs towards I
    with pytest.raises(ValueError, match="unknown slicing axis"):
        slice_axis_index((1, 0, 0, 0, 1, 0, 0, 0, 1), "oblique")


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_to_slices_is_exactly_undone(axis):
    a = np.arange(4 * 5 * 6).reshape(4, 5, 6)  # (z, y, x)
    s = to_slices(a, axis)
    assert s.shape[0] == a.shape[2 - axis]
    np.testing.assert_array_equal(from_slices(s, axis), a)
    assert inplane_axes(axis) == tuple(i for i in range(3) if i != axis)


def test_normalisation_modes():
    v = np.concatenate([np.linspace(0, 100, 999), [1e6]]).astype(np.float32)
    p = normalize(v, Normalization("percentile", 0.5, 99.5))
    assert p.dtype == np.float32 and p.min() == 0.0 and p.max() == 1.0
    z = normalize(v, Normalization("zscore"))
    assert abs(z.mean()) < 1e-4 and abs(z.std() - 1) < 1e-4
    np.testing.assert_array_equal(normalize(v, Normalization("none")), v)
    assert not normalize(np.ones(10), Normalization("percentile")).any()


def test_pad_crop_and_resized_shape():
    x = torch.randn(2, 3, 13, 20)
    p = pad_to_multiple(x, 8)
    assert p.shape[-2:] == (16, 24) and torch.equal(crop_to(p, (13, 20)), x) and not p[..., 13:, :].any()
    assert pad_to_multiple(x[..., :8, :16], 8).shape[-2:] == (8, 16)
    assert resized_shape((100, 50), (0.5, 2.0), (1.0, 1.0)) == (50, 100)


# ------------------------------------------------------------------------------------------- predictor


def test_outputs_types_ranges_and_grid(base_prediction, make_volume):
    ref = make_volume()
    pred = base_prediction
    assert isinstance(pred, Prediction)
    assert pred.labelmap.GetPixelID() == sitk.sitkUInt8
    assert pred.uncertainty.GetPixelID() == sitk.sitkFloat32
    assert pred.probability.GetPixelID() == sitk.sitkFloat32
    for image in (pred.labelmap, pred.uncertainty, pred.probability):
        assert_on_grid(image, ref)
    u = sitk.GetArrayFromImage(pred.uncertainty)
    p = sitk.GetArrayFromImage(pred.probability)
    labels = sitk.GetArrayFromImage(pred.labelmap)
    assert u.min() > 0 and u.max() <= 1 and p.min() >= 0 and p.max() <= 1
    assert set(np.unique(labels)) <= {0, 1}
    # two labels: label 1 exactly where the foreground probability wins
    np.testing.assert_array_equal(labels == 1, p > 0.5)


def test_summary_has_the_documented_fields(base_prediction, tiny_bundle, make_volume):
    s = base_prediction.summary
    assert set(s) == SUMMARY_KEYS
    assert s["schema_version"] == 1 and s["case_id"] == "case" and s["device"] == "cpu" and s["outputs"] == {}
    assert s["model"] == {"id": "test-model", "version": "0.0.1", "sha256": tiny_bundle.sha256, "path": str(tiny_bundle.path)}
    assert s["geometry"] == {"size": [32, 32, 6], "spacing": [0.7, 0.9, 2.5], "origin": [-12.5, 30.25, 7.0],
                             "direction": list(make_volume().GetDirection())}
    assert s["inputs"] == [{"channel": c, "volume": 0} for c in ("pre", "early", "late")]
    assert s["slicing"] == {"axis": "axial", "index_axis": 2, "count": 6, "context_slices": 0}
    assert s["test_time_augmentation"] == "none"
    assert set(s["timings_s"]) == {"read", "preprocess", "inference", "postprocess", "total"}
    assert s["postprocessing"] == {"component_max_uncertainty": None, "segmentation_min_lesion": None,
                                   "components_removed": 0, "components_refined": None}
    assert all(v >= 0 for v in s["timings_s"].values())
    c = s["classification"]
    assert set(c) == CLASSIFICATION_KEYS
    assert c["reader"] is None and s["lesions"] == []  # a card without a lesion reader (tests: test_reader.py)
    assert c["classes"] == ["no pCR", "pCR"] and c["positive_class"] == "pCR" and c["fusion"] == "lesion-weighted evidence pooling"
    assert sum(c["probabilities"]) == pytest.approx(1) and sum(c["belief"]) + c["uncertainty"] == pytest.approx(1)
    assert c["predicted_class"] == c["classes"][c["predicted_index"]] == c["classes"][int(np.argmax(c["probabilities"]))]
    assert c["positive_probability"] == c["probabilities"][1]
    assert c["verdict"] == ("review" if c["uncertainty"] > tiny_bundle.card.review_uncertainty else "reliable")
    labels = sitk.GetArrayFromImage(base_prediction.labelmap)
    (seg,) = s["segments"]
    assert set(seg) == {"label", "name", "color", "voxel_count", "volume_ml", "mean_uncertainty"}
    assert seg["voxel_count"] == int((labels == 1).sum())
    assert seg["volume_ml"] == pytest.approx(seg["voxel_count"] * 0.7 * 0.9 * 2.5 / 1000)
    assert len(s["slices"]) == 6 and set(s["slices"][0]) == {"index", "lesion_voxels", "probabilities", "uncertainty"}
    assert [sl["lesion_voxels"] for sl in s["slices"]] == [int((labels[k] > 0).sum()) for k in range(6)]
    # the case opinion is the lesion-weighted pooling of the slice opinions (alpha_s = K p_s / u_s)
    slice_alpha = np.array([np.array(sl["probabilities"]) * 2 / sl["uncertainty"] for sl in s["slices"]])
    fused = fuse_slice_opinions(slice_alpha, np.array([sl["lesion_voxels"] for sl in s["slices"]]))
    np.testing.assert_allclose(c["probabilities"], fused / fused.sum(), rtol=1e-9)
    assert c["uncertainty"] == pytest.approx(2 / fused.sum())


def test_segments_with_voxels_report_mean_uncertainty(tiny_bundle, make_volume):
    # force every voxel to the lesion label by a bundle whose model always votes label 1
    class Lesion(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            out = self.inner(x)
            seg = out.seg_alpha.clone()
            seg[:, 1] = seg[:, 0] + 1.0
            return out._replace(seg_alpha=seg)

    bundle = dataclasses.replace(tiny_bundle, model=Lesion(tiny_bundle.model))
    pred = Predictor(bundle, device="cpu").predict(make_volume())
    (seg,) = pred.summary["segments"]
    assert seg["voxel_count"] == 32 * 32 * 6
    assert seg["mean_uncertainty"] == pytest.approx(float(sitk.GetArrayFromImage(pred.uncertainty).mean()), rel=1e-5)
    assert all(sl["lesion_voxels"] == 32 * 32 for sl in pred.summary["slices"])


class _LeftHeavy(torch.nn.Module):
    """Lesion evidence rising along W (column index) and class evidence from the input's left half: a network
    whose mirrored views disagree in known ways."""

    def forward(self, x):
        b, _, h, w = x.shape
        ramp = torch.arange(w, dtype=torch.float32).expand(b, h, w)
        seg = torch.stack([torch.ones(b, h, w), 1.0 + ramp], dim=1)
        cls = torch.stack([torch.ones(b), 1.0 + x[..., : w // 2].sum(dim=(1, 2, 3))], dim=1)
        return UMLOutput(seg_alpha=seg, mutual_alpha=seg, deep_logits=(), cls_alpha=cls)


def test_forward_views_average_the_mirrored_views_known_values():
    x = torch.zeros(1, 1, 2, 4)
    x[..., 0] = 1.0  # the left column
    net = _LeftHeavy()
    seg, cls = forward_views(net, x, "none")
    assert seg[0, 1, 0].tolist() == [1.0, 2.0, 3.0, 4.0] and cls[0].tolist() == [1.0, 3.0]
    seg, cls = forward_views(net, x, "flip_w")  # the ramp and its mirror image average to 2.5 everywhere
    assert seg[0, 1].tolist() == [[2.5] * 4] * 2 and seg[0, 0].tolist() == [[1.0] * 4] * 2
    assert cls[0].tolist() == [1.0, 2.0]  # the mirrored view's left half is empty: (3 + 1) / 2
    seg4, cls4 = forward_views(net, x, "flip_hw")  # up-down mirrors change nothing of this network
    assert torch.equal(seg4, seg) and torch.equal(cls4, cls)
    with pytest.raises(ValueError, match="flip_w"):
        forward_views(net, x, "dihedral")
    for mode in NETWORK_TTA_MODES:  # every rule a card may name has its views
        forward_views(net, x, mode)


def test_card_test_time_augmentation_reads_multi_phase_cases_and_is_reported(tiny_bundle, make_volume):
    volume = [make_volume()] * 3  # the three phases (here one image thrice: not a replicated single volume)
    plain = Predictor(tiny_bundle, device="cpu").predict(volume)
    card = dataclasses.replace(tiny_bundle.card, test_time_augmentation="flip_hw")
    bundle = dataclasses.replace(tiny_bundle, card=card)
    got = Predictor(bundle, device="cpu").predict(volume)
    assert got.summary["test_time_augmentation"] == "flip_hw"
    # by hand: the four views of the normalised slices, averaged
    stack = torch.from_numpy(to_slices(normalize(sitk.GetArrayFromImage(volume[0]).astype(np.float32),
                                                 card.input.normalization), 2))[:, None].repeat(1, 3, 1, 1)
    with torch.inference_mode():
        seg, _ = forward_views(tiny_bundle.model, pad_to_multiple(stack, 8), "flip_hw")
    seg = crop_to(seg, stack.shape[-2:]).clamp_min(1.0)
    expected = from_slices((2.0 / seg.sum(dim=1)).numpy(), 2)
    np.testing.assert_allclose(sitk.GetArrayFromImage(got.uncertainty), expected, rtol=1e-5, atol=1e-6)
    assert not np.array_equal(sitk.GetArrayFromImage(got.uncertainty), sitk.GetArrayFromImage(plain.uncertainty))
    one = Predictor(bundle, device="cpu").predict(volume[0])  # one volume is read once, as its calibration was fitted
    assert one.summary["test_time_augmentation"] == "none"
    np.testing.assert_array_equal(sitk.GetArrayFromImage(one.uncertainty),
                                  sitk.GetArrayFromImage(Predictor(tiny_bundle, device="cpu").predict(volume[0]).uncertainty))


def test_one_volume_is_replicated_and_three_are_accepted(predictor, base_prediction, make_volume):
    v = make_volume()
    same = predictor.predict([v, v, v])
    np.testing.assert_array_equal(sitk.GetArrayFromImage(same.uncertainty), sitk.GetArrayFromImage(base_prediction.uncertainty))
    three = predictor.predict([make_volume(seed=s, scale=50.0 * (s + 1)) for s in range(3)], case_id="dce")
    assert three.summary["inputs"] == [{"channel": c, "volume": i} for i, c in enumerate(("pre", "early", "late"))]
    assert three.summary["case_id"] == "dce"
    assert not np.array_equal(sitk.GetArrayFromImage(three.uncertainty), sitk.GetArrayFromImage(base_prediction.uncertainty))
    # a 4D image gives the same as its volumes
    vols = [make_volume(seed=s, scale=50.0 * (s + 1)) for s in range(3)]
    four = predictor.predict(sitk.JoinSeries(vols))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(four.uncertainty), sitk.GetArrayFromImage(three.uncertainty))
    assert_on_grid(four.labelmap, vols[0])


@pytest.mark.parametrize("count", [2, 4])
def test_wrong_number_of_volumes_is_refused(predictor, make_volume, count):
    with pytest.raises(UMLInputError, match=f"got {count} volumes .* takes 1 \\(replicated into all 3 channels\\) or 3 \\(pre, early, late\\)"):
        predictor.predict([make_volume(seed=s) for s in range(count)])


def test_other_bad_volumes_are_refused(predictor, make_volume):
    with pytest.raises(UMLInputError, match="not on the same voxel grid"):
        predictor.predict([make_volume(), make_volume(origin=(0, 0, 0)), make_volume()])
    # 32 x 4 x 32: the axial slices are 32 x 4 voxels
    with pytest.raises(UMLInputError, match="smaller than 8x8"):
        predictor.predict(make_volume(size=(32, 4, 32), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)))
    nan = sitk.GetArrayFromImage(make_volume())
    nan[0, 0, 0] = np.nan
    with pytest.raises(UMLInputError, match="NaN/Inf"):
        predictor.predict(sitk.GetImageFromArray(nan))
    with pytest.raises(UMLInputError, match="SimpleITK image"):
        predictor.predict([np.zeros((6, 32, 32))])


def test_progress_fraction_increases_and_stages_are_named(predictor, make_volume):
    calls = []
    predictor.predict(make_volume(size=(32, 24, 9)), progress=lambda *a: calls.append(a))
    fractions = [f for _, f, _ in calls]
    assert fractions[0] == 0.0 and fractions[-1] == 1.0
    assert all(b >= a for a, b in zip(fractions, fractions[1:]))
    stages = [s for s, _, _ in calls]
    assert stages[0] == "preprocess" and stages[-1] == "postprocess"
    assert stages.count("inference") == 3  # 9 slices in batches of 4
    assert all(isinstance(m, str) and m for _, _, m in calls)


def test_cancel_raises_and_stops_between_batches(predictor, make_volume, tmp_path):
    with pytest.raises(CancelledError):
        predictor.predict(make_volume(), cancel=lambda: True)
    checks = []
    progress = []

    def cancel():
        checks.append(1)
        return len(checks) > 2  # before preprocessing, first batch; then stop

    with pytest.raises(CancelledError, match="after 4 of 9 slices"):
        predictor.predict(make_volume(size=(32, 32, 9)), cancel=cancel, progress=lambda *a: progress.append(a))
    assert [s for s, _, _ in progress].count("inference") == 1
    assert list(tmp_path.iterdir()) == []  # the predictor writes nothing


def test_with_context_stacks_each_channels_neighbours_and_repeats_the_edges():
    stack = (10 * np.arange(2)[None, :] + np.arange(4)[:, None]).astype(np.float32)[:, :, None, None]  # (4, 2, 1, 1)
    out = with_context(stack, 0, 4, 1)
    assert out.shape == (4, 6, 1, 1)
    # value 10 c + z: channel c's slices z-1, z, z+1, then channel c+1's; slice -1 and 4 repeat slices 0 and 3
    np.testing.assert_array_equal(out[:, :, 0, 0], [[0, 0, 1, 10, 10, 11], [0, 1, 2, 10, 11, 12],
                                                    [1, 2, 3, 11, 12, 13], [2, 3, 3, 12, 13, 13]])
    np.testing.assert_array_equal(with_context(stack, 1, 3, 2)[:, :5, 0, 0], [[0, 0, 1, 2, 3], [0, 1, 2, 3, 3]])
    assert torch.equal(with_context(torch.from_numpy(stack), 0, 4, 1), torch.from_numpy(out))
    np.testing.assert_array_equal(with_context(stack, 1, 3, 0), stack[1:3])
    np.testing.assert_array_equal(with_context(stack[:1], 0, 1, 1)[0, :, 0, 0], [0, 0, 0, 10, 10, 10])  # one slice


def test_a_2_5d_bundle_sees_each_slice_with_its_neighbours(bundle_factory, make_volume, monkeypatch):
    path = bundle_factory(config_overrides={"in_channels": 9}, input=InputSpec(context_slices=1))
    bundle = load_bundle(path)
    seen = []
    forward = bundle.model.forward
    monkeypatch.setattr(bundle.model, "forward", lambda x: seen.append(x.clone()) or forward(x))
    volume = make_volume(size=(16, 16, 5))
    phases = [volume, make_volume(size=(16, 16, 5), seed=1), make_volume(size=(16, 16, 5), seed=2)]
    result = Predictor(bundle, device="cpu", batch_size=2).predict(phases)
    assert result.summary["slicing"]["context_slices"] == 1
    assert_on_grid(result.labelmap, volume)
    x = torch.cat(seen)[..., :16, :16]  # (5, 9, 16, 16) before padding; each channel normalised on its own
    assert x.shape[:2] == (5, 9)
    for z in range(5):
        for d in (-1, 0, 1):
            source = min(max(z + d, 0), 4)
            for c in range(3):  # channel c of slice z + d = the centre of channel c when slice z + d is segmented
                assert torch.equal(x[z, c * 3 + 1 + d], x[source, c * 3 + 1])
    assert not torch.equal(x[2, 0], x[2, 1]) and not torch.equal(x[2, 1], x[2, 4])  # slices and phases differ


def test_batch_size_does_not_change_the_result(tiny_bundle, make_volume):
    v = make_volume(size=(24, 32, 7))
    results = [Predictor(tiny_bundle, device="cpu", batch_size=b).predict(v) for b in (1, 3, 8)]
    ref = results[0]
    for r in results[1:]:
        np.testing.assert_array_equal(sitk.GetArrayFromImage(r.labelmap), sitk.GetArrayFromImage(ref.labelmap))
        np.testing.assert_allclose(sitk.GetArrayFromImage(r.uncertainty), sitk.GetArrayFromImage(ref.uncertainty), atol=1e-5)
        np.testing.assert_allclose(r.summary["classification"]["probabilities"], ref.summary["classification"]["probabilities"], atol=1e-5)


def test_slicing_axis_is_a_pure_permutation(predictor, make_volume):
    v = make_volume(size=(32, 24, 5))
    permuted = sitk.PermuteAxes(v, [2, 0, 1])  # same physical volume, S along index axis 0
    assert np.allclose(permuted.TransformIndexToPhysicalPoint((1, 2, 3)), v.TransformIndexToPhysicalPoint((2, 3, 1)))
    a = predictor.predict(v)
    b = predictor.predict(permuted)
    assert b.summary["slicing"]["index_axis"] == 0
    assert_on_grid(b.labelmap, permuted)
    back = sitk.PermuteAxes(b.uncertainty, [1, 2, 0])
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(a.uncertainty))
    assert b.summary["classification"] == a.summary["classification"]


def test_inplane_resampling_returns_to_the_input_grid(bundle_factory, make_volume):
    spec = InputSpec(target_spacing=(1.4, 1.8), normalization=Normalization("zscore"))
    bundle = load_bundle(bundle_factory(input=spec))
    v = make_volume(size=(40, 28, 5))
    pred = Predictor(bundle, device="cpu").predict(v)
    for image in (pred.labelmap, pred.uncertainty, pred.probability):
        assert_on_grid(image, v)
    u = sitk.GetArrayFromImage(pred.uncertainty)
    assert u.min() > 0 and u.max() <= 1
    # resampled to 20 x 14 voxels, run, resampled back: smooth, not the native-resolution result
    native = Predictor(load_bundle(bundle_factory(input=InputSpec(normalization=Normalization("zscore"))))).predict(v)
    assert not np.allclose(u, sitk.GetArrayFromImage(native.uncertainty))


@pytest.mark.parametrize("fmt, atol", [("nii.gz", 1e-6), ("nrrd", 1e-12)])
@pytest.mark.parametrize("source", ["nii.gz", "nrrd", "dicom"])
def test_geometry_round_trip_through_files(tmp_path, predictor, make_volume, dicom_writer, source, fmt, atol):
    """Oblique, anisotropic, off-origin input file -> predict -> written outputs on the grid read from the input."""
    image = make_volume(size=(32, 24, 6), spacing=(0.7, 0.9, 2.5), origin=(-101.25, 37.5, -12.125))
    if source == "dicom":
        path = dicom_writer(image, tmp_path / "series")
    else:
        path = tmp_path / f"input.{source}"
        sitk.WriteImage(image, str(path))
    (read,) = read_case([path])
    assert_on_grid(read, image, atol=1e-5)  # what the format keeps of the original geometry
    pred = predictor.predict(read)
    assert_on_grid(pred.labelmap, read)  # exactly, in memory
    for name, out in (("segmentation", pred.labelmap), ("uncertainty", pred.uncertainty)):
        written = sitk.ReadImage(str(write_image_atomic(out, tmp_path / f"{name}.{fmt}")))
        assert_on_grid(written, read, atol=atol)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(written), sitk.GetArrayFromImage(out))


def test_bad_construction_arguments(tiny_bundle):
    for bad in (0, -1, 2.5, True, "8"):
        with pytest.raises(UMLInputError, match="batch size must be a positive integer"):
            Predictor(tiny_bundle, batch_size=bad)
    with pytest.raises(UMLInputError, match="unknown device"):
        Predictor(tiny_bundle, device="tpu")
    for bad in ("bf16", "fp16", None):
        with pytest.raises(UMLInputError, match="unknown precision .*choose fp32"):
            Predictor(tiny_bundle, precision=bad)
    with pytest.raises(UMLInputError, match="ModelBundle"):
        Predictor(tiny_bundle.model)
    if not torch.cuda.is_available():
        with pytest.raises(UMLInputError, match="no CUDA GPU"):
            Predictor(tiny_bundle, device="cuda")
        assert Predictor(tiny_bundle, device="auto").device == "cpu"


def test_no_autocast_on_cpu(predictor, make_volume, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("autocast must not be used on the CPU")

    monkeypatch.setattr(torch, "autocast", refuse)
    monkeypatch.setattr(torch.amp, "autocast", refuse)
    assert isinstance(predictor._autocast(), contextlib.nullcontext)
    predictor.predict(make_volume())
    mixed = Predictor(predictor.bundle, device="cpu", precision="mixed")  # stays fp32 on the CPU too
    assert isinstance(mixed._autocast(), contextlib.nullcontext)
    assert mixed.predict(make_volume()).summary["precision"] == "mixed"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_fp32_reproduces_cpu(tiny_bundle_dir, make_volume):
    """The default precision gives the CPU's outputs on a GPU (TF32 convolutions off), and restores TF32 after."""
    volume = make_volume()
    cpu = Predictor(load_bundle(tiny_bundle_dir), device="cpu").predict(volume)
    tf32 = torch.backends.cudnn.allow_tf32
    gpu = Predictor(load_bundle(tiny_bundle_dir), device="cuda").predict(volume)
    assert torch.backends.cudnn.allow_tf32 == tf32
    assert gpu.summary["device"] == "cuda" and gpu.summary["precision"] == "fp32"
    np.testing.assert_allclose(sitk.GetArrayFromImage(gpu.uncertainty), sitk.GetArrayFromImage(cpu.uncertainty), atol=1e-5)
    np.testing.assert_allclose(gpu.summary["classification"]["probabilities"],
                               cpu.summary["classification"]["probabilities"], atol=1e-5)


class _OOMAbove(torch.nn.Module):
    """Pretends to run out of memory on batches larger than ``limit``."""

    def __init__(self, inner, limit):
        super().__init__()
        self.inner, self.limit, self.sizes = inner, limit, []

    def forward(self, x):
        self.sizes.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError("fake out of memory")
        return self.inner(x)


def test_out_of_memory_halves_the_batch(tiny_bundle, base_prediction, make_volume):
    model = _OOMAbove(tiny_bundle.model, limit=2)
    bundle = dataclasses.replace(tiny_bundle, model=model)
    messages = []
    pred = Predictor(bundle, device="cpu", batch_size=8).predict(make_volume(), progress=lambda s, f, m: messages.append(m))
    assert model.sizes == [6, 4, 2, 2, 2]  # batch 8 (6 slices) -> OOM, 4 -> OOM, then batches of 2
    assert any("retrying with batch size 4" in m for m in messages)
    np.testing.assert_allclose(sitk.GetArrayFromImage(pred.uncertainty), sitk.GetArrayFromImage(base_prediction.uncertainty), atol=1e-5)
    model_always = _OOMAbove(tiny_bundle.model, limit=0)
    with pytest.raises(UMLError, match="out of memory on the CPU"):
        Predictor(dataclasses.replace(tiny_bundle, model=model_always), device="cpu").predict(make_volume())


def test_remove_uncertain_components_drops_whole_components_by_mean_uncertainty():
    labels = np.zeros((3, 8, 8), np.uint8)
    labels[0:2, 1:3, 1:3] = 1  # component A: 8 voxels, mean u 0.02
    labels[1, 5:7, 5:7] = 1  # component B: 4 voxels, mean u 0.25 (one voxel 0.7)
    labels[2, 0, 7] = 1  # component C: touches A only diagonally -> separate (6-connected), u 0.09
    u = np.full(labels.shape, 0.5, np.float32)
    u[0:2, 1:3, 1:3] = 0.02
    u[1, 5:7, 5:7] = 0.1
    u[1, 6, 6] = 0.7
    u[2, 0, 7] = 0.09
    before = labels.copy()
    out, removed = remove_uncertain_components(labels, u, 0.1)
    np.testing.assert_array_equal(labels, before)  # input untouched
    assert removed == 1 and out[1, 5:7, 5:7].sum() == 0
    assert out[0:2, 1:3, 1:3].all() and out[2, 0, 7] == 1
    assert remove_uncertain_components(labels, u, 0.05)[1] == 2
    assert remove_uncertain_components(np.zeros_like(labels), u, 0.1)[1] == 0


def test_card_component_filter_runs_before_the_case_fusion(tiny_bundle, make_volume):
    card = dataclasses.replace(tiny_bundle.card, component_max_uncertainty=1e-6)  # removes every component
    pred = Predictor(dataclasses.replace(tiny_bundle, card=card), device="cpu").predict(make_volume())
    assert sitk.GetArrayFromImage(pred.labelmap).max() == 0
    assert all(sl["lesion_voxels"] == 0 for sl in pred.summary["slices"])
    assert pred.summary["postprocessing"]["component_max_uncertainty"] == 1e-6


def test_one_volume_gets_the_single_volume_calibration_and_three_the_case_calibration(tiny_bundle, make_volume):
    three, one = {"slope": 0.5, "intercept": -1.0}, {"slope": 2.0, "intercept": 1.0}
    volume = make_volume()

    def predict(card, volumes):
        return Predictor(dataclasses.replace(tiny_bundle, card=card), device="cpu").predict(volumes).summary

    raw_card = tiny_bundle.card
    card = dataclasses.replace(raw_card, case_calibration=three, single_volume_calibration=one)
    for volumes, used, field in (([volume], one, "single_volume_calibration"), ([volume] * 3, three, "case_calibration")):
        raw = predict(raw_card, volumes)["classification"]
        got = predict(card, volumes)["classification"]
        assert raw["calibration"] is None and got["calibration"] == field
        strength = 2.0 / raw["uncertainty"]
        expected = calibrate_case_alpha(strength * np.array(raw["probabilities"]), used["slope"], used["intercept"])
        np.testing.assert_allclose(got["probabilities"], expected / strength, rtol=1e-9)
        assert got["uncertainty"] == pytest.approx(raw["uncertainty"])  # the strength is kept


def test_strict_fp32_turns_tf32_convolutions_off_and_restores_them():
    saved = torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = True
        with pytest.raises(RuntimeError):
            with strict_fp32():
                assert torch.backends.cudnn.allow_tf32 is False
                raise RuntimeError("restored even when the block fails")
        assert torch.backends.cudnn.allow_tf32 is True
    finally:
        torch.backends.cudnn.allow_tf32 = saved
