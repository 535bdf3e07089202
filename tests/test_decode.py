import numpy as np
import pytest

from pipeline.formats.images import Reject, decode_image, encode_image
from tests.corpus import corpus, good_image


@pytest.mark.parametrize("name", sorted(corpus()))
def test_every_corpus_input_is_a_sample_or_a_reason(name):
    data, expected_reason = corpus()[name]
    if expected_reason is None:
        decoded = decode_image(data, 32, "center_crop")
        assert decoded.image.mode == "RGB" and decoded.image.size == (32, 32)
    else:
        with pytest.raises(Reject, match=expected_reason):
            decode_image(data, 32, "center_crop")


def test_exif_rotation_is_applied():
    decoded = decode_image(corpus()["dogs/rotated.jpg"][0], 0, "none")
    assert decoded.original_size == (20, 40)
    pixels = np.asarray(decoded.image).astype(int)
    assert pixels[5, 10, 0] > 200 and pixels[5, 10, 2] < 60  # top: red
    assert pixels[35, 10, 2] > 200 and pixels[35, 10, 0] < 60  # bottom: blue


def test_conversions_to_rgb():
    def pixel(name, xy=(2, 2)):
        return np.asarray(decode_image(corpus()[name][0], 0, "none").image)[xy[1], xy[0]]

    assert tuple(pixel("dogs/palette.png", (2, 2))) == (10, 20, 200)  # opaque palette colour
    assert tuple(pixel("dogs/palette.png", (12, 2))) == (255, 255, 255)  # transparent -> white
    assert tuple(pixel("dogs/gray-alpha.png")) == (255, 255, 255)  # fully transparent LA
    assert tuple(pixel("dogs/sixteen.png")) == (255, 255, 255)  # 16-bit white stays white
    r, g, _b = pixel("dogs/animated.gif")
    assert g > 150 and r < 50  # the first (green) frame
    c = pixel("dogs/cmyk.jpg")
    assert c[0] > 200 and c[1] < 60 and c[2] < 60  # CMYK (0, 255, 255, 0) is red


def test_resize_modes_and_limits():
    image = good_image(0, (80, 40))
    data = encode_image(image, "png", 95)
    assert decode_image(data, 16, "center_crop").image.size == (16, 16)
    padded = np.asarray(decode_image(data, 16, "pad").image)
    assert padded.shape == (16, 16, 3) and padded[0].max() == 0  # black bars top and bottom
    assert decode_image(data, 16, "none").image.size == (80, 40)
    with pytest.raises(Reject, match="too small"):
        decode_image(data, 16, "center_crop", min_size=64)
    with pytest.raises(Reject, match="decompression bomb"):
        decode_image(data, 16, "center_crop", max_pixels=1000)


def test_encoding_is_deterministic():
    image = good_image(5)
    for encoding in ("png", "jpg", "webp"):
        assert encode_image(image, encoding, 90) == encode_image(image, encoding, 90)


def test_large_jpeg_reduced_decode_matches_full_decode():
    image = good_image(7, (64, 48)).resize((1600, 1200), resample=3)  # smooth, photo-sized
    data = encode_image(image, "jpg", 95)
    fast = np.asarray(decode_image(data, 64, "center_crop").image).astype(int)
    full = np.asarray(decode_image(encode_image(image, "png", 95), 64, "center_crop").image)
    assert fast.shape == (64, 64, 3)
    assert np.abs(fast - full.astype(int)).mean() < 4.0
