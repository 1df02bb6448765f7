"""Tests of the seeded synthetic breast DCE-MRI generator (umlcore.synthetic)."""

import numpy as np
import pytest
import SimpleITK as sitk

from umlcore.errors import UMLInputError
from umlcore import synthetic
from umlcore.synthetic import KINETICS, _shift_axis, MARGINS, SyntheticCase, case_label, generate_case, is_suspicious

SMALL = (8, 32, 32)


def test_same_seed_gives_identical_case():
    a = generate_case(11, shape=(12, 48, 48))
    b = generate_case(11, shape=(12, 48, 48))
    assert np.array_equal(a.phases, b.phases)
    assert np.array_equal(a.mask, b.mask)
    assert (a.label, a.clean_label, a.spacing, a.origin, a.direction) == (b.label, b.clean_label, b.spacing, b.origin, b.direction)
    assert a.lesions == b.lesions


def test_different_seeds_differ():
    a = generate_case(1, shape=SMALL, randomize="none")
    b = generate_case(2, shape=SMALL, randomize="none")
    assert a.phases.shape == b.phases.shape
    assert not np.array_equal(a.phases, b.phases)


@pytest.mark.parametrize("randomize", ["none", "light", "full"])
def test_shapes_dtypes_and_values(randomize):
    for seed in range(6):
        case = generate_case(seed, shape=(10, 40, 48), randomize=randomize)
        assert isinstance(case, SyntheticCase)
        assert case.phases.dtype == np.float32 and case.mask.dtype == np.uint8
        assert case.phases.shape[0] == 3 and case.phases.shape[1:] == case.mask.shape
        if randomize == "full":
            assert sorted(case.mask.shape) == sorted((10, 40, 48))
        else:
            assert case.mask.shape == (10, 40, 48)
        assert set(np.unique(case.mask).tolist()) <= {0, 1}
        assert np.isfinite(case.phases).all()
        assert case.label in (0, 1) and case.clean_label in (0, 1)
        assert case.seed == seed
        assert len(case.spacing) == 3 and len(case.origin) == 3 and len(case.direction) == 9


def test_nominal_intensities_are_in_a_plausible_mri_range():
    case = generate_case(3, shape=(12, 64, 64), randomize="none")
    pre = case.phases[0]
    assert pre.min() >= 0.0  # magnitude images
    assert 700.0 < np.percentile(pre, 99) < 2000.0  # fat ~1000 on non-fat-suppressed T1w
    assert np.percentile(pre, 5) < 60.0  # air


def test_lesion_free_fraction_and_lesion_prob_extremes():
    cases = [generate_case(s, shape=SMALL, randomize="none") for s in range(80)]
    free = np.mean([not c.lesions for c in cases])
    assert 0.10 <= free <= 0.36  # expected 1 - 0.78 = 0.22
    assert all(not generate_case(s, shape=SMALL, lesion_prob=0.0).lesions for s in range(10))
    assert all(generate_case(s, shape=SMALL, lesion_prob=1.0).lesions for s in range(10))


@pytest.mark.parametrize("randomize", ["none", "full"])
def test_label_rule_and_lesion_records(randomize):
    seen = set()
    for seed in range(40):
        case = generate_case(seed, shape=SMALL, randomize=randomize, label_noise=0.0)
        assert case.label == case.clean_label
        expected = int(any(les["kinetics"] == "washout" or les["margin"] == "spiculated" for les in case.lesions))
        assert case.clean_label == expected == case_label(case.lesions)
        assert bool(case.mask.any()) == bool(case.lesions)
        # multifocal lesions share one phenotype
        assert len({(les["margin"], les["kinetics"]) for les in case.lesions}) <= 1
        for les in case.lesions:
            assert les["margin"] in MARGINS and les["kinetics"] in KINETICS
            assert les["voxels"] >= 1
            assert case.mask[les["center_index"]] == 1
            seen.add((les["margin"], les["kinetics"]))
    assert len(seen) >= 6  # the phenotypes are actually varied


def test_is_suspicious_table():
    assert is_suspicious("smooth", "washout") and is_suspicious("spiculated", "persistent")
    assert not is_suspicious("smooth", "persistent") and not is_suspicious("lobulated", "plateau")
    assert case_label([]) == 0


def test_label_noise_rate():
    cases = [generate_case(s, shape=SMALL, randomize="none", label_noise=0.2) for s in range(300)]
    rate = np.mean([c.label != c.clean_label for c in cases])
    assert 0.14 <= rate <= 0.26
    assert all(c.info["label_flipped"] == (c.label != c.clean_label) for c in cases)
    assert all(c.label == c.clean_label for c in (generate_case(s, shape=SMALL, label_noise=0.0) for s in range(30)))


def test_kinetic_curves_inside_lesions():
    found = {k: 0 for k in KINETICS}
    for seed in range(60):
        case = generate_case(seed, shape=(16, 64, 64), randomize="none", lesion_prob=1.0)
        m = case.mask.astype(bool)
        pre, early, late = (float(case.phases[i][m].mean()) for i in range(3))
        kinetics = case.lesions[0]["kinetics"]
        found[kinetics] += 1
        assert early > 1.4 * pre, (seed, pre, early)
        if kinetics == "washout":
            assert late < 0.97 * early, (seed, early, late)
        elif kinetics == "persistent":
            assert late > 1.03 * early, (seed, early, late)
        else:
            assert abs(late / early - 1.0) < 0.1, (seed, early, late)
    assert min(found.values()) >= 5


def _best_shift(image: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """The in-plane shift (voxels, step 0.25) of ``mask`` that best matches ``image`` around the lesion."""
    zz, yy, xx = np.nonzero(mask)
    box = (slice(zz.min(), zz.max() + 1), slice(max(yy.min() - 4, 0), yy.max() + 5),
           slice(max(xx.min() - 4, 0), xx.max() + 5))
    e = image[box] - image[box].mean()
    grid = np.arange(-2.0, 2.01, 0.25)
    scores = {}
    for dy in grid:
        for dx in grid:
            m = _shift_axis(_shift_axis(mask.astype(np.float32), dy, 1), dx, 2)[box]
            scores[(float(dy), float(dx))] = float((e * (m - m.mean())).sum())
    return max(scores, key=scores.get)


def test_motion_moves_the_pre_contrast_phase_and_the_mask_stays_on_the_enhancing_lesion(monkeypatch):
    """With motion between the phases the mask lies where the lesion enhances (the post-contrast phases, where a
    reader draws it), so a model that follows the visible lesion is not marked wrong by up to 1.5 voxels."""
    shifts = []

    def spy(a, shift, axis):
        shifts.append((shift, axis))
        return _shift_axis(a, shift, axis)

    monkeypatch.setattr(synthetic, "_shift_axis", spy)
    case = generate_case(38, shape=(16, 96, 96))  # full randomisation; this seed moves by (-0.91, +1.25) voxels
    dy, dx = (s for s, _ in shifts[:2])
    assert abs(dy) > 0.8 and abs(dx) > 0.8 and case.mask.sum() > 300
    phases, mask = case.axial_arrays()
    assert _best_shift(phases[1], mask) == (0.0, 0.0)  # early
    assert _best_shift(phases[2], mask) == (0.0, 0.0)  # late


def test_geometry_round_trip_through_sitk():
    axial_axes = set()
    for seed in range(25):
        case = generate_case(seed, shape=(10, 40, 48), randomize="full", lesion_prob=1.0)
        images = case.to_sitk()
        assert len(images) == 3
        for k, image in enumerate(images + [case.mask_sitk()]):
            assert image.GetSpacing() == pytest.approx(case.spacing)
            assert image.GetOrigin() == pytest.approx(case.origin)
            assert image.GetDirection() == pytest.approx(case.direction)
            array = sitk.GetArrayFromImage(image)
            assert np.array_equal(array, case.phases[k] if k < 3 else case.mask)
        # the axial axis is the one whose direction is patient superior-inferior
        d = np.asarray(case.direction).reshape(3, 3)
        ax = case.axial_axis()
        axial_axes.add(ax)
        assert abs(d[2, 2 - ax]) == pytest.approx(1.0)
        assert case.mask.shape[ax] == 10  # the axial grid had 10 slices
        assert case.spacing[2 - ax] == pytest.approx(case.info["slice_spacing"])
        # reoriented to LPS, the arrays are the canonical axial grid
        canon = sitk.GetArrayFromImage(sitk.DICOMOrient(case.mask_sitk(), "LPS"))
        assert canon.shape == (10, 40, 48)
        phases_ax, mask_ax = case.axial_arrays()
        assert np.array_equal(mask_ax, canon)
        assert np.array_equal(phases_ax[1], sitk.GetArrayFromImage(sitk.DICOMOrient(images[1], "LPS")))
        # each lesion's physical centre lies in the mask at its recorded index
        mask_img = case.mask_sitk()
        for les in case.lesions:
            index = mask_img.TransformPhysicalPointToIndex(les["center"])
            assert tuple(reversed(index)) == les["center_index"]
            assert mask_img[index] == 1
    assert len(axial_axes) >= 2  # orientation really is randomised
    plain = generate_case(0, shape=SMALL, randomize="none")
    assert plain.direction == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0) and plain.axial_axis() == 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(seed=-1), "seed"),
        (dict(seed=1.5), "seed"),
        (dict(seed=0, shape=(8, 32)), "shape"),
        (dict(seed=0, shape=(2, 32, 32)), "shape"),
        (dict(seed=0, randomize=True), "randomize"),
        (dict(seed=0, randomize="heavy"), "randomize"),
        (dict(seed=0, label_noise=0.7), "label_noise"),
        (dict(seed=0, lesion_prob=1.5), "lesion_prob"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(UMLInputError, match=match):
        generate_case(**kwargs)


def test_info_records_the_motion_of_the_pre_contrast_phase(monkeypatch):
    """``info["motion_voxels"]`` is the in-plane shift the generator applied to the pre-contrast phase (half of the
    ``full`` cases), ``(0.0, 0.0)`` where it applied none; the other randomisations record none."""
    import umlcore.synthetic as syn

    applied = []
    shift = syn._shift_axis
    monkeypatch.setattr(syn, "_shift_axis", lambda a, s, axis: applied.append(float(s)) or shift(a, s, axis))
    moved = 0
    for seed in range(8):
        applied.clear()
        case = syn.generate_case(seed, shape=(8, 48, 48))
        assert case.info["motion_voxels"] == (tuple(applied) if applied else (0.0, 0.0))
        moved += bool(applied)
        assert all(abs(v) <= 1.5 for v in case.info["motion_voxels"])
    assert 0 < moved < 8  # seeds 0-7 hold both kinds
    assert syn.generate_case(0, shape=(8, 48, 48), randomize="light").info["motion_voxels"] == (0.0, 0.0)
