"""Image codecs shared by the prepared store and the compact store: one image in, one standard stream out.

Every stream is an ordinary file body that libpng, libwebp or libjpeg decode as it is (the `raw` codec is
the exception: the bare uint8 pixels in row-major [H, W, C] order). A 3-channel image whose channels are
all equal (Fashion-MNIST, other grey sources) is encoded as a 1-channel stream, which is smaller and, for
JPEG and WebP, loses nothing to colour conversion; readers expand a grey stream to the stored channel
count. Encoding is deterministic: equal pixels, codec and quality give equal bytes with the pinned Pillow.

    codec            lossless  quality  block  stream
    raw              yes       -        1      uint8 pixels, H*W*C bytes
    png              yes       -        1      PNG (zlib level 6, no optimise pass)
    webp-lossless    yes       -        1      WebP VP8L (effort: Pillow quality 80, method 4)
    webp             no        1..100   16     WebP VP8, 4:2:0 (macroblocks of 16 px)
    jpeg             no        1..100   16     baseline JPEG, 4:2:0 (MCUs of 16 px; 8 px when grey)

`block` is the codec's unit of independent coding: a dropped region filled with one flat colour costs
almost nothing only where it covers whole blocks, so writers fill dropped patches before encoding
(`fill_dropped`) and readers mask them out again.
"""
from __future__ import annotations

import io

import numpy as np

from dq.errors import DQError, first_line

CODECS = ("raw", "png", "webp-lossless", "webp", "jpeg")
LOSSLESS = ("raw", "png", "webp-lossless")
BLOCK = {"raw": 1, "png": 1, "webp-lossless": 1, "webp": 16, "jpeg": 16}
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
        return f"codec: one of {', '.join(CODECS)}"
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
        return "quality: an integer in [1, 100]"
    return None


def is_lossless(codec: str) -> bool:
    return codec in LOSSLESS


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
    if codec == "raw":
        return np.ascontiguousarray(image, dtype=np.uint8).tobytes()
    pil = _pil(image)
    buf = io.BytesIO()
    if codec == "png":
        pil.save(buf, format="PNG", compress_level=PNG_LEVEL, optimize=False)
    elif codec == "webp-lossless":
        pil.save(buf, format="WEBP", lossless=True, quality=WEBP_LOSSLESS_EFFORT, method=WEBP_METHOD, exact=True)
    elif codec == "webp":
        pil.save(buf, format="WEBP", lossless=False, quality=int(quality), method=WEBP_METHOD)
    elif codec == "jpeg":
        pil.save(buf, format="JPEG", quality=int(quality), subsampling="4:2:0", optimize=False, progressive=False)
    else:
        raise ValueError(f"unknown codec {codec!r}; expected one of {', '.join(CODECS)}")
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
    """uint8 [H, W, C]: one stream decoded by Pillow, checked against the expected `shape`."""
    buf = bytes(data) if not isinstance(data, bytes) else data
    if codec == "raw":
        if len(buf) != int(np.prod(shape)):
            raise CodecError(f"raw stream of {len(buf)} bytes, expected {int(np.prod(shape))}")
        return np.frombuffer(buf, dtype=np.uint8).reshape(shape).copy()
    if codec not in CODECS:
        raise CodecError(f"unknown codec {codec!r}; expected one of {', '.join(CODECS)}")
    from PIL import Image

    try:
        with Image.open(io.BytesIO(buf)) as pil:
            pil.load()
            if pil.mode not in ("L", "RGB"):
                pil = pil.convert("RGB")
            pixels = np.asarray(pil)
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError... for damaged streams
        raise CodecError(f"not a valid {codec} stream ({first_line(exc)})") from None
    return _expand(pixels, shape)


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


def fill_dropped(image: np.ndarray, keep_pixels: np.ndarray) -> np.ndarray:
    """uint8 [H, W, C]: `image` with every dropped pixel set to one flat colour, the mean kept colour.

    A flat region costs a lossless codec a run of zero residuals and a block codec one DC term per block,
    and the mean colour keeps the block edges between kept and dropped content soft, so the lossy codecs
    spend few bits there. `keep_pixels` is bool [H, W], True where the pixel is kept (dq.grid.pixel_keep).
    """
    out = np.array(image, dtype=np.uint8, copy=True)
    if keep_pixels.all():
        return out
    kept = image[keep_pixels]
    colour = np.rint(kept.mean(axis=0)).astype(np.uint8) if kept.size else np.zeros(image.shape[2], np.uint8)
    out[~keep_pixels] = colour
    return out


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
    """uint8 [n, H, W, C]: streams of one codec decoded by the fastest CPU decoder measured (bench/format.py).

    JPEG: `decode_jpeg_batch`, one call. WebP (both kinds): torchvision's libwebp binding, about 3x Pillow
    at 32 px; WebP decoding is bit-exact, so the pixels equal Pillow's. PNG and raw: `decode`. A stream that
    fails raises CodecError with `index` set to its position in `streams`.
    """
    out = np.empty((len(streams),) + tuple(shape), np.uint8)
    if codec == "jpeg":
        try:
            return decode_jpeg_batch(streams, shape)
        except CodecError:
            pass  # decode one by one to find the bad stream
    one = (lambda s: decode_jpeg_batch([s], shape)[0]) if codec == "jpeg" else \
        (lambda s: _decode_webp(s, shape)) if codec in ("webp", "webp-lossless") else \
        (lambda s: decode(s, codec, shape))
    for i, stream in enumerate(streams):
        try:
            out[i] = one(stream)
        except CodecError as exc:
            exc.index = i
            raise
    return out
