"""dq.data.codec: the one image codec module of the prepared and compact stores."""
import numpy as np
import pytest

from dq.data import codec


def photo() -> np.ndarray:
    from skimage import data  # a real photo shipped inside scikit-image: no download

    return np.ascontiguousarray(data.chelsea()[:96, :128])


def grey() -> np.ndarray:
    rng = np.random.default_rng(0)
    g = rng.integers(0, 256, (32, 32, 1), dtype=np.uint8)
    return np.repeat(g, 3, axis=2)


@pytest.mark.parametrize("name", [name for name in codec.CODECS if codec.is_lossless(name)])
@pytest.mark.parametrize("make", [photo, grey])
def test_lossless_codecs_give_back_the_exact_pixels(name, make):
    image = make()
    stream = codec.encode(image, name)
    assert np.array_equal(codec.decode(stream, name, image.shape), image)


@pytest.mark.parametrize("name", codec.CODECS)
def test_equal_inputs_give_equal_bytes(name):
    image = photo()
    assert codec.encode(image, name, 75) == codec.encode(image.copy(), name, 75)


@pytest.mark.parametrize("name", ["jpeg", "webp"])
def test_lossy_codecs_stay_close_and_quality_matters(name):
    image = photo()
    small, large = codec.encode(image, name, 50), codec.encode(image, name, 95)
    assert len(small) < len(large) < image.nbytes
    back = codec.decode(large, name, image.shape).astype(int)
    assert np.abs(back - image).mean() < 4.0


def test_grey_images_are_stored_as_one_channel_streams():
    image = grey()
    from PIL import Image
    import io

    stream = codec.encode(image, "png")
    assert Image.open(io.BytesIO(stream)).mode == "L"
    # a grey JPEG decodes to exactly equal channels, so the image stays grey
    back = codec.decode(codec.encode(image, "jpeg", 90), "jpeg", image.shape)
    assert np.array_equal(back[..., 0], back[..., 1]) and np.array_equal(back[..., 0], back[..., 2])


def test_streams_are_the_standard_files():
    image = photo()
    assert codec.encode(image, "png")[:8] == b"\x89PNG\r\n\x1a\n"
    assert codec.encode(image, "jpeg")[:2] == b"\xff\xd8"
    for name in ("webp", "webp-lossless"):
        s = codec.encode(image, name)
        assert s[:4] == b"RIFF" and s[8:12] == b"WEBP"
    assert codec.encode(image, "webp-lossless")[12:16] == b"VP8L"


def test_torchvision_batch_decode_equals_pillow_for_jpeg():
    image = photo()
    streams = [codec.encode(image, "jpeg", q) for q in (60, 90)]
    batch = codec.decode_jpeg_batch(streams, image.shape)
    for s, b in zip(streams, batch):
        assert np.array_equal(b, codec.decode(s, "jpeg", image.shape))


@pytest.mark.parametrize("name", ["png", "webp-lossless", "webp", "jpeg", "raw"])
def test_a_damaged_stream_is_a_one_line_codec_error(name):
    image = photo()
    stream = codec.encode(image, name)
    with pytest.raises(codec.CodecError) as err:
        codec.decode(stream[: len(stream) // 3], name, image.shape)
    assert "\n" not in str(err.value)


def test_a_stream_of_another_size_is_refused():
    image = photo()
    with pytest.raises(codec.CodecError, match="expected"):
        codec.decode(codec.encode(image, "png"), "png", (96, 96, 3))


def patch_mask(shape, patch: int, drop_share: float, seed: int = 0) -> np.ndarray:
    """bool [H, W]: a random `drop_share` of the patch x patch cells dropped (False)."""
    rows, cols = shape[0] // patch, shape[1] // patch
    cells = np.random.default_rng(seed).random(rows * cols) >= drop_share
    return cells.reshape(rows, cols).repeat(patch, 0).repeat(patch, 1)


def test_zero_pad_sets_only_dropped_pixels_to_zero():
    image = photo()
    keep = patch_mask(image.shape, 16, 0.3)
    padded = codec.zero_pad(image, keep)
    assert np.array_equal(padded[keep], image[keep]) and (padded[~keep] == 0).all()


def block_pad_reference(image, keep):
    """dq.data.codec.block_pad's rule written as loops over the 16x16 macroblocks in raster order."""
    out = image.astype(np.float64).copy()
    carried = np.full(3, 128.0)
    for my in range(0, image.shape[0], 16):
        for mx in range(0, image.shape[1], 16):
            mb_keep = keep[my:my + 16, mx:mx + 16]
            mb_mean = image[my:my + 16, mx:mx + 16][mb_keep].mean(axis=0) if mb_keep.any() else carried
            for by in (my, my + 8):
                for bx in (mx, mx + 8):
                    k = keep[by:by + 8, bx:bx + 8]
                    block = out[by:by + 8, bx:bx + 8]
                    block[~k] = image[by:by + 8, bx:bx + 8][k].mean(axis=0) if k.any() else mb_mean
            carried = out[my + 8:my + 16, mx + 8:mx + 16].reshape(-1, 3).mean(axis=0) if mb_keep.any() \
                else carried  # a wholly dropped macroblock passes the colour on unchanged
    return np.where(keep[..., None], image, np.clip(np.rint(out), 0, 255).astype(np.uint8))


@pytest.mark.parametrize("patch, share", [(16, 0.3), (16, 0.7), (4, 0.25), (8, 0.5)])
def test_block_pad_follows_its_rule(patch, share):
    image = photo()
    keep = patch_mask(image.shape, patch, share, seed=patch)
    keep[:16, :32] = False  # the first two macroblocks wholly dropped: they take the neutral 128
    padded = codec.block_pad(image, keep)
    assert np.array_equal(padded[keep], image[keep])
    assert (padded[:16, :32] == 128).all()
    np.testing.assert_array_equal(padded, block_pad_reference(image, keep))


@pytest.mark.parametrize("name", ["png", "webp-lossless", "webp", "jpeg"])
def test_encode_dropped_keeps_the_shortest_candidate_and_drops_pay_on_photos(name):
    image = photo()
    keep = patch_mask(image.shape, 16, 0.25, seed=1)
    stream = codec.encode_dropped(image, keep, name, 90)
    candidates = [codec.encode(codec.PADDINGS[pad](image, keep), name, 90) for pad in codec.CODECS.get(name).pads]
    assert stream == min(candidates, key=len)  # the first of the shortest
    # the dropped blocks cost (nearly) nothing: bytes close to the kept share of the whole image's
    assert len(stream) < (keep.mean() + 0.06) * len(codec.encode(image, name, 90))
    decoded = codec.decode(stream, name, image.shape)
    if codec.is_lossless(name):
        assert np.array_equal(decoded[keep], image[keep])
    assert codec.encode_dropped(image, np.ones_like(keep), name, 90) == codec.encode(image, name, 90)


@pytest.mark.parametrize("setting, problem", [
    (("gif", 90), "codec"), (("jpeg", 0), "quality"), (("jpeg", 101), "quality"), (("png", True), "quality"),
])
def test_codec_problem_names_the_bad_key(setting, problem):
    assert codec.codec_problem(*setting).startswith(problem)
    assert codec.codec_problem("jpeg", 90) is None


@pytest.mark.parametrize("codec_name", ["png", "webp-lossless", "webp", "jpeg", "raw"])
def test_decode_batch_equals_the_one_by_one_decoders(codec_name):
    rng = np.random.default_rng(3)
    images = np.repeat(rng.integers(0, 256, (4, 16, 16, 1), dtype=np.uint8), 3, axis=3)
    images[2:] = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)  # two grey, two colour
    streams = [codec.encode(image, codec_name, 80) for image in images]
    batch = codec.decode_batch(streams, codec_name, (16, 16, 3))
    one = (codec.decode_jpeg_batch(streams, (16, 16, 3)) if codec_name == "jpeg"
           else np.stack([codec.decode(s, codec_name, (16, 16, 3)) for s in streams]))
    np.testing.assert_array_equal(batch, one)  # WebP decoding is bit-exact: torchvision's equals Pillow's
    if codec.is_lossless(codec_name):
        np.testing.assert_array_equal(batch, images)
    streams[1] = streams[1][: len(streams[1]) // 3]
    with pytest.raises(codec.CodecError) as info:
        codec.decode_batch(streams, codec_name, (16, 16, 3))
    assert info.value.index == 1
