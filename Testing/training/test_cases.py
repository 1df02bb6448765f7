"""training.cases: synthetic cases given as a user would give them, with optional noise."""

import numpy as np
import pytest
import SimpleITK as sitk

from training.cases import INPUT_MODES, add_noise, input_volumes, synthetic_stream
from umlcore.synthetic import generate_case


def test_each_input_mode_gives_what_a_user_would_load():
    case = generate_case(3, shape=(6, 32, 32))
    phases = [sitk.GetArrayFromImage(v) for v in case.to_sitk()]
    assert [len(input_volumes(case, m)) for m in INPUT_MODES] == [3, 1, 1, 1, 1]
    for i, mode in enumerate(("pre", "early", "late")):
        np.testing.assert_array_equal(sitk.GetArrayFromImage(input_volumes(case, mode)[0]), phases[i])
    (sub,) = input_volumes(case, "subtraction")
    np.testing.assert_allclose(sitk.GetArrayFromImage(sub), phases[1] - phases[0], rtol=1e-6)
    assert sub.GetOrigin() == case.to_sitk()[0].GetOrigin()
    with pytest.raises(ValueError, match="unknown input"):
        input_volumes(case, "t2")


def test_noise_is_a_fraction_of_each_volumes_range_and_none_at_zero():
    (image,) = input_volumes(generate_case(4, shape=(6, 32, 32)), "early")
    assert add_noise([image], 0.0, np.random.default_rng(0))[0] is image
    a = sitk.GetArrayFromImage(image).astype(np.float32)
    lo, hi = np.percentile(a, (0.5, 99.5))
    (noisy,) = add_noise([image], 0.1, np.random.default_rng(0))
    assert np.std(sitk.GetArrayFromImage(noisy) - a) == pytest.approx(0.1 * (hi - lo), rel=0.05)
    assert noisy.GetSpacing() == image.GetSpacing()


def test_cases_are_the_same_with_worker_processes():
    import multiprocessing

    serial = list(synthetic_stream(range(5, 8), (6, 32, 32), 0.0))
    parallel = list(synthetic_stream(range(5, 8), (6, 32, 32), 0.0, workers=2))
    assert [c.seed for c in parallel] == [5, 6, 7]
    assert all(np.array_equal(a.phases, b.phases) and a.label == b.label for a, b in zip(serial, parallel))
    stream = synthetic_stream(range(20), (6, 32, 32), 0.0, workers=2)
    assert next(stream).seed == 0
    stream.close()  # abandoned early: the worker processes go with it
    assert not multiprocessing.active_children()
