"""umlcore.predictor: outputs on the input grid, channels, batching, progress, cancel, trace, fallbacks."""

import contextlib
import dataclasses

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from umlcore.bundle import load_bundle
from umlcore.card import InputSpec, Normalization
from umlcore.errors import CancelledError, UMLError, UMLInputError
from umlcore.fusion import CaseOpinion, calibrate_case_alpha
from umlcore.io import read_case, write_image_atomic
from umlcore.predictor import TRACE_STEPS, NetworkSlices, Prediction, Predictor, strict_fp32
from umlcore.preprocess import to_slices


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
    phases = [make_volume(seed=s, scale=100.0 + 20 * s) for s in range(3)]
    for volumes, used, field in (([volume], one, "single_volume_calibration"), (phases, three, "case_calibration")):
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


def test_trace_hands_out_every_step_and_the_written_outputs_follow_from_them(predictor, make_volume):
    volume = make_volume()
    seen = {}
    pred = predictor.predict(volume, trace=lambda step, value: seen.setdefault(step, value))
    assert list(seen) == [s for s in TRACE_STEPS if s != "reading"]  # no reader in this card
    stack, network = seen["stack"], seen["network"]
    assert stack.shape == (6, 3, 32, 32) and stack.dtype == np.float32  # one volume replicated into 3 channels
    assert isinstance(network, NetworkSlices) and network.cls_alpha.shape == (6, 2)
    np.testing.assert_array_equal(to_slices(sitk.GetArrayFromImage(pred.labelmap), 2), seen["filtered"])
    np.testing.assert_array_equal(to_slices(sitk.GetArrayFromImage(pred.uncertainty), 2), network.uncertainty)
    opinion = seen["opinion"]
    assert isinstance(opinion, CaseOpinion) and opinion.calibration is None
    np.testing.assert_allclose(pred.summary["classification"]["probabilities"], opinion.alpha / opinion.alpha.sum())
    # tracing changes nothing
    again = predictor.predict(volume)
    assert again.summary["classification"] == pred.summary["classification"]


def test_identical_volumes_are_read_as_one_and_say_so(predictor, make_volume):
    """The same file given as every phase is one volume: it gets the one-volume calibration, not the phases'."""
    volume = make_volume()
    three = predictor.predict([volume, volume, volume]).summary
    one = predictor.predict(volume).summary
    assert three["inputs"] == one["inputs"] == [{"channel": c, "volume": 0} for c in ("pre", "early", "late")]
    assert three["input_check"]["notes"] == ["the 3 volumes given are identical: read as one volume"]
    assert one["input_check"] == {"status": "ok", "reasons": [], "notes": []}
    assert three["classification"] == one["classification"]
    copy = sitk.Image(volume)
    assert predictor.predict([volume, copy, volume]).summary["input_check"]["notes"]  # equal voxels, not the same object


def test_a_spacing_outside_the_cards_range_is_refused(tiny_bundle, make_volume):
    card = dataclasses.replace(tiny_bundle.card, input=dataclasses.replace(tiny_bundle.card.input, spacing_mm=(0.2, 8.0)))
    predictor = Predictor(dataclasses.replace(tiny_bundle, card=card), device="cpu")
    for spacing, fix in (((0.0008, 0.0008, 0.002), "metres or microns"), ((1000.0, 1000.0, 1000.0), "metres or microns")):
        with pytest.raises(UMLInputError, match=f"voxel spacing .* lies outside the 0.2-8 mm .*{fix}"):
            predictor.predict(make_volume(spacing=spacing))
    assert predictor.predict(make_volume()).summary["classification"]  # 0.7 x 0.9 x 2.5 mm is read


def test_the_batch_shrinks_to_the_memory_limit_and_too_large_slices_are_refused(tiny_bundle, make_volume):
    from umlcore.resources import estimate_bytes

    limit = 0.5 * 2**30
    predictor = Predictor(tiny_bundle, device="cpu", batch_size=8, max_memory_gb=0.5)
    need = {b: estimate_bytes(tiny_bundle.card, 6, (512, 512), b) for b in (1, 2, 4, 8)}
    assert need[1] < need[2] < need[4] < need[8]
    expected = max([b for b in (1, 2, 4, 8) if need[b] <= limit], default=1)
    assert need[8] > limit, "the test needs a limit that shrinks the batch"
    assert predictor.plan_batch((512, 512, 6), (1, 0, 0, 0, 1, 0, 0, 0, 1), (1.0, 1.0, 1.0)) == expected < 8
    with pytest.raises(UMLInputError, match=r"a 4096x4096x2 volume needs about .* GB of memory to segment, more than "
                                            r"the limit of 0\.5 GB .*--max-memory-gb"):
        predictor.plan_batch((4096, 4096, 2), (1, 0, 0, 0, 1, 0, 0, 0, 1), (0.5, 0.5, 2.0))
    with pytest.raises(UMLInputError, match="needs about"):
        Predictor(tiny_bundle, device="cpu", max_memory_gb=1e-6).predict(make_volume())
    with pytest.raises(UMLInputError, match="memory limit must be a positive"):
        Predictor(tiny_bundle, device="cpu", max_memory_gb=0)


class _Seen(torch.nn.Module):
    """The network, recording the in-plane size of every batch it reads."""

    def __init__(self, inner, seen):
        super().__init__()
        self.inner, self.config, self.seen = inner, inner.config, seen

    def forward(self, x):
        self.seen.append(tuple(x.shape[-2:]))
        return self.inner(x)


def test_target_size_resizes_every_slice_and_the_outputs_return_to_the_input_grid(bundle_factory, make_volume):
    spec = InputSpec(target_size=(32, 48), normalization=Normalization("zscore"))
    bundle, seen = load_bundle(bundle_factory(input=spec)), []
    v = make_volume(size=(40, 28, 5))
    pred = Predictor(dataclasses.replace(bundle, model=_Seen(bundle.model, seen)), device="cpu").predict(v)
    assert seen == [(32, 48)] * 5  # rows x columns, whatever the slices' own 28 x 40 (one slice a pass on the CPU)
    for image in (pred.labelmap, pred.uncertainty, pred.probability):
        assert_on_grid(image, v)
    u = sitk.GetArrayFromImage(pred.uncertainty)
    assert u.min() > 0 and u.max() <= 1
    card = dataclasses.replace(bundle.card, input=dataclasses.replace(spec, target_size=None))
    native = Predictor(dataclasses.replace(bundle, card=card), device="cpu").predict(v)  # the slices' own size
    assert not np.allclose(u, sitk.GetArrayFromImage(native.uncertainty))


def picture(seed=0, h=30, w=40):
    """The three single-slice colour volumes of a picture, as umlcore.io.read_case gives them."""
    rng = np.random.default_rng(seed)
    return [sitk.GetImageFromArray(rng.integers(0, 256, (1, h, w)).astype(np.uint8)) for _ in range(3)]


@pytest.fixture(scope="module")
def picture_predictor(picture_bundle_dir):
    return Predictor(load_bundle(picture_bundle_dir), device="cpu")


def test_a_picture_model_reads_pictures_and_refuses_volumes(picture_predictor, predictor, make_volume):
    rgb = picture()
    pred = picture_predictor.predict(rgb)
    assert_on_grid(pred.labelmap, rgb[0])
    assert pred.summary["slicing"]["count"] == 1 and pred.summary["geometry"]["size"] == [40, 30, 1]
    with pytest.raises(UMLInputError, match=r"^model 'test-picture-model' reads 2D pictures \(red, green, blue\), but got "
                                            r"a 3D volume of 32x32x6 voxels: give a picture \(PNG, JPEG, BMP, TIFF\)$"):
        picture_predictor.predict(make_volume())
    with pytest.raises(UMLInputError, match=r"^model 'test-model' reads 3D volumes \(pre, early, late\), but got a 2D "
                                            r"picture or single slice of 40x30 pixels: give the whole volume"):
        predictor.predict(rgb)


def test_a_grey_picture_is_replicated_and_a_grey_rgb_picture_read_as_one(picture_predictor):
    rgb = picture()
    grey = picture_predictor.predict(rgb[:1]).summary
    assert [i["volume"] for i in grey["inputs"]] == [0, 0, 0] and grey["input_check"]["notes"] == []
    same = picture_predictor.predict([rgb[0]] * 3).summary
    assert same["input_check"]["notes"] == ["the picture's 3 colours are identical (a grey picture): read as one grey picture"]
    assert same["classification"] == grey["classification"]
    with pytest.raises(UMLInputError, match=r"got a picture of 4 channel\(s\) but model 'test-picture-model' takes 1 "
                                            r"\(a grey picture, replicated into all 3 channels\) or 3 \(red, green, blue\)"):
        picture_predictor.predict(rgb + picture(seed=1)[:1])


def test_the_memory_plan_of_a_resized_picture(picture_predictor):
    """A 4000 x 3000 photo resized to 64 x 64: the network's activations are small, its arrays are not."""
    from umlcore.resources import estimate_bytes

    card = picture_predictor.card
    assert Predictor(picture_predictor.bundle, device="cpu", batch_size=8).plan_batch((4000, 3000, 1), IDENTITY,
                                                                                      (1.0, 1.0, 1.0)) == 8
    resized = estimate_bytes(card, 1, (3000, 4000), 1, network_hw=(64, 64))
    assert estimate_bytes(card, 1, (64, 64), 1) < resized < estimate_bytes(card, 1, (3000, 4000), 1)
    with pytest.raises(UMLInputError, match="a 4000x3000x1 volume needs about"):
        Predictor(picture_predictor.bundle, device="cpu", max_memory_gb=resized / 2**30 / 2).plan_batch(
            (4000, 3000, 1), IDENTITY, (1.0, 1.0, 1.0))


IDENTITY = (1, 0, 0, 0, 1, 0, 0, 0, 1)


def test_batch_size_auto_is_one_slice_on_the_cpu_and_a_fixed_batch_stays(picture_predictor):
    assert picture_predictor.batch_size == 1 and picture_predictor.device == "cpu"
    assert Predictor(picture_predictor.bundle, device="cpu", batch_size=3).batch_size == 3
    with pytest.raises(UMLInputError, match="positive integer or 'auto'"):
        Predictor(picture_predictor.bundle, device="cpu", batch_size="big")


def test_the_allocator_is_tuned_where_glibc_runs():
    import sys

    from umlcore.allocator import tune_allocator

    assert tune_allocator() is sys.platform.startswith("linux")
