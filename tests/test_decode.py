"""decode_image: every supported format and pixel mode becomes uint8 RGB at the model's size."""

import numpy as np
import pytest
from PIL import Image

from helpers import encode, photo
from transforms.decode import ImageDecodeError, PreprocessConfig, decode_image

SIZE = 64
CONFIG = PreprocessConfig(image_size=SIZE)


@pytest.fixture(scope="module")
def chelsea():
    return photo("chelsea")  # 451x300 RGB


def _mean_abs(a, b):
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean())


@pytest.mark.parametrize(
    "fmt, save_args",
    [("JPEG", {"quality": 95}), ("PNG", {}), ("GIF", {}), ("BMP", {}), ("WEBP", {"lossless": True}), ("TIFF", {})],
)
def test_each_supported_format_decodes_to_the_same_picture(chelsea, fmt, save_args):
    reference = decode_image(encode(chelsea, "PNG"), CONFIG)
    pixels = decode_image(encode(chelsea, fmt, **save_args), CONFIG)
    assert pixels.shape == (SIZE, SIZE, 3) and pixels.dtype == np.uint8
    assert _mean_abs(pixels, reference) < (12 if fmt == "GIF" else 3)  # GIF quantises to 256 colours


def test_animated_gif_uses_its_first_frame(chelsea):
    frames = [Image.fromarray(chelsea), Image.fromarray(255 - chelsea)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    first = decode_image(encode(frames[0], "GIF"), CONFIG)
    np.testing.assert_array_equal(decode_image(data, CONFIG), first)


def test_animated_webp_uses_its_first_frame(chelsea):
    frames = [Image.fromarray(chelsea), Image.fromarray(255 - chelsea)]
    data = encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    assert _mean_abs(decode_image(data, CONFIG), decode_image(encode(chelsea, "PNG"), CONFIG)) < 1


@pytest.mark.parametrize("mode", ["L", "1", "P", "CMYK", "YCbCr", "RGB"])
def test_every_opaque_mode_becomes_rgb(chelsea, mode):
    image = Image.fromarray(chelsea).convert(mode)
    fmt = "JPEG" if mode in ("CMYK", "YCbCr") else "PNG" if mode != "YCbCr" else "JPEG"
    expected = decode_image(encode(image.convert("RGB"), "PNG"), CONFIG)
    pixels = decode_image(encode(image, fmt, **({"quality": 95} if fmt == "JPEG" else {})), CONFIG)
    assert pixels.shape == (SIZE, SIZE, 3)
    assert _mean_abs(pixels, expected) < 3


def test_sixteen_bit_greyscale_is_scaled_not_clipped():
    ramp = (np.linspace(0, 65535, 256 * 256).reshape(256, 256)).astype(np.uint16)
    pixels = decode_image(encode(Image.fromarray(ramp), "PNG"), CONFIG)
    expected = decode_image(encode(Image.fromarray(np.round(ramp / 257).astype(np.uint8)), "PNG"), CONFIG)
    assert np.abs(pixels.astype(int) - expected.astype(int)).max() <= 1
    assert pixels.max() > 250  # clipping would have made almost everything 255; scaling keeps the ramp
    assert pixels.min() < 5


@pytest.mark.parametrize("mode, fmt", [("RGBA", "PNG"), ("LA", "PNG"), ("RGBA", "WEBP"), ("RGBA", "TIFF")])
def test_transparent_pixels_are_composited_on_white(mode, fmt):
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[..., 0] = 200  # red-ish, fully transparent everywhere...
    rgba[:, :20, 3] = 255  # ...except the left half, opaque
    image = Image.fromarray(rgba, "RGBA")
    image = image.convert(mode)
    pixels = decode_image(encode(image, fmt, **({"lossless": True} if fmt == "WEBP" else {})), PreprocessConfig(image_size=40))
    np.testing.assert_array_equal(pixels[:, 30:], 255)  # transparent half shows the white background
    assert pixels[:, :10].mean() < 200


def test_palette_with_transparency_index_is_composited_on_white():
    image = Image.new("P", (32, 32), 1)
    image.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    image.paste(0, (16, 0, 32, 32))
    image.info["transparency"] = 0
    pixels = decode_image(encode(image, "PNG", transparency=0), PreprocessConfig(image_size=32))
    np.testing.assert_array_equal(pixels[:, 20:], 255)
    assert (pixels[:, :12] == [10, 200, 30]).all()


def test_exif_orientation_is_applied(chelsea):
    upright = decode_image(encode(chelsea, "PNG"), CONFIG)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: a viewer turns it 90 degrees clockwise
    stored = Image.fromarray(chelsea).transpose(Image.Transpose.ROTATE_90)
    np.testing.assert_array_equal(decode_image(encode(stored, "PNG", exif=exif), CONFIG), upright)


def test_stretch_keeps_the_whole_picture_and_center_crop_keeps_its_middle():
    wide = np.zeros((100, 300, 3), np.uint8)
    wide[:, :100] = (255, 0, 0)  # left third red, middle third green, right third blue
    wide[:, 100:200] = (0, 255, 0)
    wide[:, 200:] = (0, 0, 255)
    stretched = decode_image(encode(wide, "PNG"), PreprocessConfig(image_size=60))
    cropped = decode_image(encode(wide, "PNG"), PreprocessConfig(image_size=60, resize_mode="center_crop"))
    assert stretched[:, 5, 0] .min() > 240 and stretched[:, 55, 2].min() > 240
    assert cropped[:, 5, 1].min() > 240 and cropped[:, 55, 1].min() > 240  # all green


def test_large_jpeg_is_decoded_at_a_reduced_scale_yet_matches_a_full_decode():
    big = np.asarray(Image.fromarray(photo("astronaut")).resize((2048, 2048), Image.Resampling.BICUBIC))
    data = encode(big, "JPEG", quality=95)
    full = np.asarray(Image.open(__import__("io").BytesIO(data)).convert("RGB").resize((SIZE, SIZE), Image.Resampling.BICUBIC))
    assert _mean_abs(decode_image(data, CONFIG), full) < 2


@pytest.mark.parametrize("data, message", [(b"", "empty"), (b"<html>not an image</html>", "Not a supported image")])
def test_non_images_are_rejected_with_a_reason(data, message):
    with pytest.raises(ImageDecodeError, match=message):
        decode_image(data, CONFIG)


def test_pixel_limit_is_enforced_from_the_header(chelsea):
    with pytest.raises(ImageDecodeError, match=r"451x300 = 135300 pixels, over the 100000-pixel limit"):
        decode_image(encode(chelsea, "PNG"), PreprocessConfig(image_size=SIZE, max_pixels=100_000))


def test_ycck_jpeg_becomes_the_same_rgb_picture(chelsea):
    """An Adobe YCCK JPEG (transform 2): YCbCr of the inverted CMY plus K. Pillow cannot write one, so we build it."""
    ycc = np.asarray(Image.fromarray(chelsea).convert("YCbCr"))
    channels = np.concatenate([ycc, np.zeros(ycc.shape[:2] + (1,), np.uint8)], axis=2)
    data = bytearray(encode(Image.fromarray(channels, "CMYK"), "JPEG", quality=95))
    adobe = data.find(b"Adobe")
    data[adobe + 11] = 2  # the APP14 transform flag: YCCK
    assert _mean_abs(decode_image(bytes(data), CONFIG), decode_image(encode(chelsea, "PNG"), CONFIG)) < 3
