"""umlcore.pictures and the picture side of umlcore.io: a picture is read as one single-slice volume per colour
(alpha dropped, values kept), and a single-slice output is written as a PNG."""

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from umlcore.errors import UMLInputError
from umlcore.io import read_case, read_geometry, read_volume, strip_image_extension
from umlcore.pictures import UNCERTAINTY_PNG_SCALE, as_png, is_picture_file, split_picture
from umlcore.predictor import Predictor

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def rgb(h=30, w=40, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3)).astype(np.uint8)


def save(tmp_path, name, array, mode=None):
    path = tmp_path / name
    Image.fromarray(array, mode).save(path)
    return path


def colours(volumes):
    """``(H, W, C)`` of single-slice volumes."""
    return np.stack([sitk.GetArrayFromImage(v)[0] for v in volumes], axis=-1)


@pytest.mark.parametrize("name", ["a.png", "a.bmp", "a.tif", "a.TIFF", "a.jpg", "a.jpeg"])
def test_an_rgb_picture_is_three_single_slice_volumes(tmp_path, name):
    picture = rgb()
    volumes = read_case([save(tmp_path, name, picture)])
    assert len(volumes) == 3
    for v in volumes:
        assert v.GetSize() == (40, 30, 1) and v.GetPixelID() == sitk.sitkUInt8  # the stored values, 0..255
        assert v.GetSpacing() == (1.0, 1.0, 1.0) and v.GetOrigin() == (0.0, 0.0, 0.0) and v.GetDirection() == IDENTITY
    if not name.lower().endswith((".jpg", ".jpeg")):  # JPEG is lossy
        np.testing.assert_array_equal(colours(volumes), picture)
    assert read_geometry(tmp_path / name) == ((40, 30, 1), (1.0, 1.0, 1.0), IDENTITY)


def test_grey_alpha_and_16_bit_pictures(tmp_path):
    picture, alpha = rgb(), np.full((30, 40), 77, np.uint8)
    (grey,) = read_case([save(tmp_path, "grey.png", picture[..., 0])])
    np.testing.assert_array_equal(sitk.GetArrayFromImage(grey)[0], picture[..., 0])
    np.testing.assert_array_equal(colours(read_case([save(tmp_path, "rgba.png", np.dstack([picture, alpha]))])), picture)
    (grey_alpha,) = read_case([save(tmp_path, "la.png", np.dstack([picture[..., 0], alpha]), "LA")])  # Pillow reads it
    np.testing.assert_array_equal(sitk.GetArrayFromImage(grey_alpha)[0], picture[..., 0])
    assert read_geometry(tmp_path / "la.png") == ((40, 30, 1), (1.0, 1.0, 1.0), IDENTITY)
    wide = (picture[..., 0].astype(np.uint16) * 250)
    (deep,) = read_case([save(tmp_path, "deep.png", wide)])
    assert deep.GetPixelID() == sitk.sitkUInt16
    np.testing.assert_array_equal(sitk.GetArrayFromImage(deep)[0], wide)
    three = read_case([save(tmp_path, f"g{i}.png", picture[..., i]) for i in range(3)])  # three grey pictures
    np.testing.assert_array_equal(colours(three), picture)


def test_a_single_slice_vector_image_and_a_2d_volume_keep_their_grid(tmp_path):
    vector = sitk.GetImageFromArray(rgb()[None], isVector=True)
    vector.SetSpacing((0.05, 0.04, 2.0))
    vector.SetOrigin((1.0, -2.0, 3.0))
    vector.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    sitk.WriteImage(vector, str(tmp_path / "v.nrrd"))
    volumes = read_case([tmp_path / "v.nrrd"])
    assert len(volumes) == 3 and all(v.GetNumberOfComponentsPerPixel() == 1 for v in volumes)
    for v in volumes:
        assert v.GetSize() == (40, 30, 1) and v.GetOrigin() == (1.0, -2.0, 3.0)
        assert v.GetDirection() == (-1, 0, 0, 0, -1, 0, 0, 0, 1) and np.allclose(v.GetSpacing(), (0.05, 0.04, 2.0))
    np.testing.assert_array_equal(colours(volumes), rgb())
    flat = sitk.GetImageFromArray(np.arange(1200, dtype=np.float32).reshape(30, 40))
    flat.SetSpacing((0.5, 0.25))
    sitk.WriteImage(flat, str(tmp_path / "flat.nii.gz"))
    (one,) = read_case([tmp_path / "flat.nii.gz"])
    assert one.GetSize() == (40, 30, 1) and one.GetSpacing() == (0.5, 0.25, 1.0)
    assert read_volume(tmp_path / "flat.nii.gz").GetDimension() == 2  # as read; read_case makes it a volume


def test_pictures_are_refused_as_volumes_are(tmp_path):
    with pytest.raises(UMLInputError, match=r"every colour of the picture is flat: .*flat.png \(red\) is a constant"):
        read_case([save(tmp_path, "flat.png", np.full((30, 40, 3), 9, np.uint8))])
    no_blue = rgb()
    no_blue[..., 2] = 0  # one flat colour is read as it is: the picture holds an image
    assert len(read_case([save(tmp_path, "no-blue.png", no_blue)])) == 3
    with pytest.raises(UMLInputError, match=r"flat.png \(grey\) is a constant image"):
        read_case([save(tmp_path, "flat.png", np.zeros((30, 40), np.uint8))])
    nan = rgb()[..., 0].astype(np.float32)
    nan[3, 4] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(nan), str(tmp_path / "nan.tif"))
    with pytest.raises(UMLInputError, match="1 NaN/Inf voxels"):
        read_case([tmp_path / "nan.tif"])
    with pytest.raises(UMLInputError, match="too small"):
        read_case([save(tmp_path, "icon.png", rgb(4, 40))])
    sitk.WriteImage(sitk.GetImageFromArray(np.stack([rgb(), rgb(seed=1)]), isVector=True), str(tmp_path / "two.nrrd"))
    with pytest.raises(UMLInputError, match="3-component \\(RGB/vector\\) pixels in a 40x30x2 image: UML reads colour as a 2D"):
        read_case([tmp_path / "two.nrrd"])
    (tmp_path / "cut.png").write_bytes(save(tmp_path, "whole.png", rgb()).read_bytes()[:200])
    with pytest.raises(UMLInputError, match="cut.png cannot be read"):
        read_case([tmp_path / "cut.png"])
    with pytest.raises(UMLInputError, match="one of them is a colour picture: give one colour picture, or several grey"):
        read_case([tmp_path / "whole.png", save(tmp_path, "grey.png", rgb()[..., 0])])


def test_picture_names_and_extensions():
    assert strip_image_extension("fundus.png") == "fundus" and strip_image_extension("ISIC_0001.JPEG") == "ISIC_0001"
    assert strip_image_extension("a.b.tiff") == "a.b" and strip_image_extension("x.bmp") == "x"
    assert strip_image_extension("x.jpg") == "x" and strip_image_extension("x.tif") == "x"
    assert is_picture_file("A.PNG") and not is_picture_file("a.nrrd")


def test_split_picture_names_the_colours_and_drops_alpha():
    image = sitk.GetImageFromArray(np.dstack([rgb(), np.full((30, 40), 5, np.uint8)]), isVector=True)
    volumes, names = split_picture(image, "p.png")
    assert names == ["p.png (red)", "p.png (green)", "p.png (blue)"] and volumes[0].GetSize() == (40, 30, 1)
    assert split_picture(sitk.GetImageFromArray(rgb()[..., 0]), "g.png")[1] == ["g.png (grey)"]


def test_single_slice_outputs_as_png():
    u = sitk.GetImageFromArray(np.array([[[0.0, 0.25, 1.0, 0.7 / 65535]]], np.float32))
    png = as_png(u, "u", UNCERTAINTY_PNG_SCALE, sitk.sitkUInt16)
    assert png.GetDimension() == 2 and png.GetPixelID() == sitk.sitkUInt16
    np.testing.assert_array_equal(sitk.GetArrayFromImage(png), [[0, 16384, 65535, 1]])  # round(u * 65535)
    labels = as_png(sitk.GetImageFromArray(np.array([[[0, 1, 2]]], np.uint8)), "labels")
    assert labels.GetPixelID() == sitk.sitkUInt8 and sitk.GetArrayFromImage(labels).tolist() == [[0, 1, 2]]
    with pytest.raises(UMLInputError, match="the labels has 2 slices .* a PNG holds one 2D picture: choose --format"):
        as_png(sitk.GetImageFromArray(np.zeros((2, 8, 8), np.uint8)), "the labels")


def test_the_predictor_takes_a_picture_as_read(picture_bundle_dir, tmp_path):
    from umlcore.bundle import load_bundle

    predictor = Predictor(load_bundle(picture_bundle_dir), device="cpu")
    path = save(tmp_path, "p.png", rgb())
    whole = predictor.predict(sitk.ReadImage(str(path)))  # the RGB image SimpleITK reads, split by the predictor
    split = predictor.predict(read_case([path]))
    assert whole.labelmap.GetSize() == (40, 30, 1)
    assert whole.summary["classification"] == split.summary["classification"]
