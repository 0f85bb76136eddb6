"""Image codecs shared by the prepared store and the compact store: one image in, one standard stream out.

Every stream is an ordinary file body that libpng, libwebp or libjpeg decode as it is (the `raw` codec is
the exception: the bare uint8 pixels in row-major [H, W, C] order). A 3-channel image whose channels are
all equal (Fashion-MNIST, other grey sources) is encoded as a 1-channel stream, which is smaller and, for
JPEG and WebP, loses nothing to colour conversion; readers expand a grey stream to the stored channel
count. Encoding is deterministic: equal pixels, codec and quality give equal bytes with the pinned Pillow.

    codec            lossless  quality  pads         stream
    raw              yes       -        zero         uint8 pixels, H*W*C bytes
    png              yes       -        zero         PNG (zlib level 6, no optimise pass)
    webp-lossless    yes       -        zero         WebP VP8L (effort: Pillow quality 80, method 4)
    webp             no        1..100   zero, block  WebP VP8, 4:2:0 (macroblocks of 16 px)
    jpeg             no        1..100   zero, block  baseline JPEG, 4:2:0 (MCUs of 16 px; 8 px when grey)

The padding of dropped pixels: writers overwrite the pixels of dropped patches before encoding
(`encode_dropped`: each codec's candidate paddings, its `pads` trait, the shortest stream wins) and
readers mask them out again, so a store that drops patches is never bigger than the same images with
nothing dropped. (Padding, not filling: the MAE fills dropped patches, dq.mae.reconstruct.)
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Callable

import numpy as np

from dq.core.errors import DQError, first_line
from dq.core.registry import Registry

# Codecs (`data.codec`, `patches.codec`): each entry's object is a `Codec`; its traits say whether it is
# lossless and which paddings of dropped pixels it tries (`pads`, names in PADDINGS; see `encode_dropped`).
CODECS = Registry("codec", "patches.codec", lossless=True, pads=("zero",))

DEFAULT_QUALITY = 90  # FFCV's JPEG quality for ImageNet training; unused by the lossless codecs
PNG_LEVEL = 6
WEBP_LOSSLESS_EFFORT = 80
WEBP_METHOD = 4


class CodecError(DQError):
    """A stream that does not decode to the expected image; callers add the file and the row.

    `index` is the position of the bad stream in a `decode_batch` call (None elsewhere).
    """

    index: int | None = None


def codec_problem(codec: str, quality: int) -> str | None:
    """Why (`codec`, `quality`) is not a valid setting, or None: params validation names the key."""
    if codec not in CODECS:
        return f"codec: {CODECS.expected()}"
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        return "quality: an integer in [1, 100]"
    return None


def is_lossless(codec: str) -> bool:
    return CODECS.get(codec).lossless


def _pil(image: np.ndarray):
    from PIL import Image

    if image.ndim != 3 or image.dtype != np.uint8 or image.shape[2] not in (1, 3):
        raise ValueError(f"expected uint8 [H, W, 1 or 3], got {image.dtype} {image.shape}")
    grey = image.shape[2] == 1 or (np.array_equal(image[..., 0], image[..., 1])
                                   and np.array_equal(image[..., 0], image[..., 2]))
    if grey:
        return Image.fromarray(np.ascontiguousarray(image[..., 0]), mode="L")
    return Image.fromarray(np.ascontiguousarray(image), mode="RGB")


def encode(image: np.ndarray, codec: str, quality: int = DEFAULT_QUALITY) -> bytes:
    """The `codec` stream of one uint8 image [H, W, C] (C = 1 or 3)."""
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; expected {CODECS.expected()}")
    return CODECS.get(codec).obj.encode(image, int(quality))


def _saved(image: np.ndarray, **save) -> bytes:
    """`image` saved by Pillow with `save` (format and options): one stream."""
    buf = io.BytesIO()
    _pil(image).save(buf, **save)
    return buf.getvalue()


def _expand(pixels: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """[H, W] or [H, W, c] decoded pixels as uint8 [H, W, C] of the expected `shape`, or a CodecError."""
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    h, w, c = shape
    if pixels.shape[:2] != (h, w) or pixels.shape[2] not in (1, c):
        raise CodecError(f"decodes to {tuple(pixels.shape)}, expected {tuple(shape)}")
    if pixels.shape[2] != c:
        pixels = np.repeat(pixels, c, axis=2)
    return np.ascontiguousarray(pixels, dtype=np.uint8)


def decode(data: bytes | np.ndarray, codec: str, shape: tuple[int, int, int]) -> np.ndarray:
    """uint8 [H, W, C]: one stream decoded (by Pillow, or the raw layout), checked against the expected `shape`."""
    buf = bytes(data) if not isinstance(data, bytes) else data
    if codec not in CODECS:
        raise CodecError(f"unknown codec {codec!r}; expected {CODECS.expected()}")
    return CODECS.get(codec).obj.decode(buf, tuple(shape))


def _pillow_decode(buf: bytes | np.ndarray, shape: tuple[int, int, int], name: str) -> np.ndarray:
    from PIL import Image

    buf = buf if isinstance(buf, bytes) else bytes(buf)
    try:
        with Image.open(io.BytesIO(buf)) as pil:
            pil.load()
            if pil.mode not in ("L", "RGB"):
                pil = pil.convert("RGB")
            pixels = np.asarray(pil)
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError... for damaged streams
        raise CodecError(f"not a valid {name} stream ({first_line(exc)})") from None
    return _expand(pixels, shape)


def _raw_decode(buf: bytes | np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    buf = buf if isinstance(buf, bytes) else bytes(buf)
    if len(buf) != int(np.prod(shape)):
        raise CodecError(f"raw stream of {len(buf)} bytes, expected {int(np.prod(shape))}")
    return np.frombuffer(buf, dtype=np.uint8).reshape(shape).copy()


def decode_jpeg_batch(streams: list[bytes | np.ndarray], shape: tuple[int, int, int],
                      device: str = "cpu") -> np.ndarray:
    """uint8 [n, H, W, C]: JPEG streams decoded by torchvision.io.decode_jpeg in one call.

    On CUDA this is nvjpeg; on the CPU it is libjpeg-turbo without Pillow's per-image overhead.
    Its pixels may differ from Pillow's by the IDCT's rounding, so a reader uses one decoder throughout.
    """
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [torch.frombuffer(bytearray(s), dtype=torch.uint8) for s in streams]
    if not tensors:
        return np.empty((0,) + tuple(shape), np.uint8)
    try:
        decoded = decode_jpeg(tensors, mode=ImageReadMode.UNCHANGED, device=device)
    except (RuntimeError, ValueError) as exc:
        raise CodecError(f"not a valid jpeg stream ({first_line(exc)})") from None
    out = np.empty((len(decoded),) + tuple(shape), np.uint8)
    for i, t in enumerate(decoded):
        out[i] = _expand(t.permute(1, 2, 0).cpu().numpy(), shape)
    return out


def zero_pad(image: np.ndarray, keep_pixels: np.ndarray) -> np.ndarray:
    """uint8 [H, W, C]: every dropped pixel 0. A lossless codec's predictors turn a zero region into a run of
    zero residuals, and on dark backgrounds (Fashion-MNIST) the dropped patches were black already."""
    return np.where(keep_pixels[..., None], image, np.uint8(0))


BLOCK_GRAIN = 8  # side of a JPEG DCT block and of WebP's 4x4 sub-blocks' macroblock quarters
MACROBLOCK = 2 * BLOCK_GRAIN  # side of the 4:2:0 MCU (JPEG) and of a WebP macroblock
NEUTRAL = 128.0  # what a block codec predicts with no neighbour: JPEG's first DC, WebP's first DC_PRED


def _on_macroblocks(image: np.ndarray, keep_pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(float64 pixels [H', W', C], kept bool [H', W']): the image grown to whole macroblocks, the margin
    counted as dropped."""
    h, w, c = image.shape
    hp, wp = -(-h // MACROBLOCK) * MACROBLOCK, -(-w // MACROBLOCK) * MACROBLOCK
    pixels = np.zeros((hp, wp, c), np.float64)
    pixels[:h, :w] = image
    kept = np.zeros((hp, wp), bool)
    kept[:h, :w] = keep_pixels
    return pixels, kept


def _block_means(pixels: np.ndarray, kept: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean kept colour [rows, cols, C], any kept [rows, cols]) of each size x size block."""
    hp, wp, c = pixels.shape
    shape = (hp // size, size, wp // size, size)
    total = (pixels * kept[..., None]).reshape(shape + (c,)).sum(axis=(1, 3))
    count = kept.reshape(shape).sum(axis=(1, 3))
    return total / np.maximum(count, 1)[..., None], count > 0


def _per_block(macroblocks: np.ndarray) -> np.ndarray:
    """[rows, cols, ...] per macroblock → [2 rows, 2 cols, ...] per 8x8 block."""
    return macroblocks.repeat(2, axis=0).repeat(2, axis=1)


def _carried(colour: np.ndarray, any_kept: np.ndarray) -> np.ndarray:
    """float64 [2 rows, 2 cols, C], one colour per 8x8 block: every block of a macroblock takes the `colour`
    [2 rows, 2 cols, C] of the bottom-right block of the last macroblock before it, in raster order, that
    keeps a pixel (`any_kept` [rows, cols]); NEUTRAL before the first."""
    c = colour.shape[2]
    corner = colour[1::2, 1::2].reshape(-1, c)  # [macroblocks in raster order, C]
    has = any_kept.reshape(-1)
    last = np.maximum.accumulate(np.where(has, np.arange(has.size), -1))
    previous = np.concatenate([[-1], last[:-1]])
    carried = np.where(previous[:, None] >= 0, corner[np.maximum(previous, 0)], NEUTRAL)
    return _per_block(carried.reshape(any_kept.shape + (c,)))


def block_pad(image: np.ndarray, keep_pixels: np.ndarray) -> np.ndarray:
    """uint8 [H, W, C]: dropped pixels padded so that a DCT codec spends least on them.

    - In an 8x8 block (JPEG's DCT block) that keeps some pixels, the dropped ones take the mean of the kept
      ones: the block's DC is unchanged and the padding adds no AC of its own.
    - A wholly dropped 8x8 block in a 16x16 macroblock (the 4:2:0 MCU) that keeps some pixels takes the
      macroblock's mean kept colour.
    - A wholly dropped macroblock takes the colour of the block its DC is predicted from: the bottom-right
      8x8 block of the previous macroblock in raster order (after its own padding), so its DC costs
      nothing; the first ones take the codecs' neutral 128.
    """
    pixels, kept = _on_macroblocks(image, keep_pixels)
    fine, fine_any = _block_means(pixels, kept, BLOCK_GRAIN)
    coarse, coarse_any = _block_means(pixels, kept, MACROBLOCK)
    colour = np.where(fine_any[..., None], fine, _per_block(coarse))
    # wholly dropped macroblocks: carry the previous macroblock's bottom-right block colour forward
    colour = np.where(_per_block(coarse_any)[..., None], colour, _carried(colour, coarse_any))
    h, w = image.shape[:2]
    padding = np.rint(colour).astype(np.uint8).repeat(BLOCK_GRAIN, axis=0).repeat(BLOCK_GRAIN, axis=1)[:h, :w]
    return np.where(keep_pixels[..., None], image, padding)


# The paddings a codec may try (its `pads` trait, in order; the shortest stream wins). bench/padding.py
# measured these and the paddings that lost: mean colour, nearest kept pixel, left/up runs, harmonic inpainting.
PADDINGS = {"zero": zero_pad, "block": block_pad}


def encode_dropped(image: np.ndarray, keep_pixels: np.ndarray, codec: str, quality: int = DEFAULT_QUALITY) -> bytes:
    """The shortest `codec` stream of `image` [H, W, C] with its dropped pixels (`keep_pixels` bool [H, W]
    False) padded by one of the codec's candidate paddings (its `pads` trait; ties go to the first).

    Readers mask the dropped pixels out again, so the padding only decides the bytes (and, for a lossy
    codec, how its blocks spill onto kept pixels). With nothing dropped the image is encoded as it is.
    """
    if keep_pixels.all():
        return encode(image, codec, quality)
    best = None
    for name in CODECS.get(codec).pads:
        stream = encode(PADDINGS[name](image, keep_pixels), codec, quality)
        if best is None or len(stream) < len(best):
            best = stream
    return best


def _decode_webp(stream: bytes | np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """uint8 [H, W, C]: one WebP stream by torchvision's libwebp binding, without Pillow's per-image cost."""
    import torch
    from torchvision.io import ImageReadMode, decode_webp

    try:
        pixels = decode_webp(torch.frombuffer(bytearray(stream), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError) as exc:
        raise CodecError(f"not a valid webp stream ({first_line(exc)})") from None
    return _expand(pixels.permute(1, 2, 0).numpy(), shape)


def decode_batch(streams: list[bytes | np.ndarray], codec: str, shape: tuple[int, int, int]) -> np.ndarray:
    """uint8 [n, H, W, C]: streams of one codec decoded by its fastest CPU decoder (bench/format.py measured).

    A codec with a batch decoder (JPEG: `decode_jpeg_batch`, one call) decodes the batch at once, and one
    stream at a time only to find a bad one; the others decode one by one with their `decode_one` (WebP:
    torchvision's libwebp binding, about 3x Pillow at 32 px and bit-exact with it). A stream that fails
    raises CodecError with `index` set to its position in `streams`.
    """
    kind = CODECS.get(codec).obj
    out = np.empty((len(streams),) + tuple(shape), np.uint8)
    if kind.decode_batch is not None:
        try:
            return kind.decode_batch(streams, tuple(shape))
        except CodecError:
            pass  # decode one by one to find the bad stream
    for i, stream in enumerate(streams):
        try:
            out[i] = kind.decode_one(stream, tuple(shape))
        except CodecError as exc:
            exc.index = i
            raise
    return out



# ---------------------------------------------------------------------------------------------------
# The built-in codecs


@dataclass(frozen=True)
class Codec:
    """What dq asks of an image codec: an encoder, a decoder of one stream checked against the image shape,
    optionally a faster decoder of one stream (`decode_one`, default `decode`) and of a whole batch."""

    encode: Callable[[np.ndarray, int], bytes]  # (uint8 [H, W, C], quality) -> stream
    decode: Callable[[bytes, tuple], np.ndarray]  # (stream, (H, W, C)) -> uint8 [H, W, C]
    decode_one: Callable | None = None
    decode_batch: Callable | None = None

    def __post_init__(self):
        if self.decode_one is None:
            object.__setattr__(self, "decode_one", self.decode)


CODECS.register("raw")(Codec(
    encode=lambda image, quality: np.ascontiguousarray(image, dtype=np.uint8).tobytes(), decode=_raw_decode))
CODECS.register("png")(Codec(
    encode=lambda image, quality: _saved(image, format="PNG", compress_level=PNG_LEVEL, optimize=False),
    decode=lambda buf, shape: _pillow_decode(buf, shape, "png")))
CODECS.register("webp-lossless")(Codec(
    encode=lambda image, quality: _saved(image, format="WEBP", lossless=True, quality=WEBP_LOSSLESS_EFFORT,
                                         method=WEBP_METHOD, exact=True),
    decode=lambda buf, shape: _pillow_decode(buf, shape, "webp-lossless"), decode_one=_decode_webp))
CODECS.register("webp", lossless=False, pads=("zero", "block"))(Codec(
    encode=lambda image, quality: _saved(image, format="WEBP", lossless=False, quality=quality, method=WEBP_METHOD),
    decode=lambda buf, shape: _pillow_decode(buf, shape, "webp"), decode_one=_decode_webp))
CODECS.register("jpeg", lossless=False, pads=("zero", "block"))(Codec(
    encode=lambda image, quality: _saved(image, format="JPEG", quality=quality, subsampling="4:2:0",
                                         optimize=False, progressive=False),
    decode=lambda buf, shape: _pillow_decode(buf, shape, "jpeg"),
    decode_one=lambda stream, shape: decode_jpeg_batch([stream], shape)[0], decode_batch=decode_jpeg_batch))
