"""What a compact store costs and keeps: kept-pixel PSNR, the JPEG q90 yardstick, `storage_metrics`."""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from dq.data import codec as codecs
from dq.compact.reader import open_compact
from dq.compact.schema import JPEG_REFERENCE_QUALITY, read_stats


def kept_pixel_errors(original: np.ndarray, decoded: np.ndarray, masks: np.ndarray) -> tuple[int, int]:
    """(sum of squared errors, number of values) over the kept pixels (masks bool [N, H, W]) of decoded vs
    original [N, H, W, C]: exact integers, so sums over batches give the PSNR of the whole set."""
    diff = (original[masks].astype(np.int64) - decoded[masks].astype(np.int64)).ravel()
    return int(np.dot(diff, diff)), int(diff.size)


def psnr_from_errors(squared_errors: int, count: int) -> float | None:
    """PSNR in dB for a summed squared error over `count` uint8 values; None when exact."""
    mse = squared_errors / count if count else 0.0
    return None if mse == 0.0 else 10.0 * math.log10(255.0 ** 2 / mse)


def kept_pixel_psnr(original: np.ndarray, decoded: np.ndarray, masks: np.ndarray) -> float | None:
    """PSNR in dB of the kept pixels (masks bool [N, H, W]) of decoded vs original [N, H, W, C]; None: exact."""
    return psnr_from_errors(*kept_pixel_errors(original, decoded, masks))


def jpeg_reference_bytes(images: np.ndarray) -> int:
    """Bytes of an ordinary JPEG q90 copy of `images` [N, H, W, C] with nothing dropped (the stats' yardstick)."""
    return sum(len(codecs.encode(image, "jpeg", JPEG_REFERENCE_QUALITY)) for image in images)


def storage_metrics(path: str | Path, full_images: int) -> dict:
    """What the compact file costs against raw pixels, a JPEG q90 copy and the source files.

    `full_images` is the size of the whole prepared training set. kept_pixel_share is about
    ratio * (1 - drop): the raw bytes of the kept patches over the full set's raw bytes. The figures
    against JPEG q90 and the source come from the file's `stats` (version 2; None for version 1).
    """
    path = Path(path)
    with open_compact(path) as cf:
        h = cf.header
        image_name = "streams" if h.uses_streams else "patches"
        stored = {"images": int(cf[image_name].id.get_storage_size()),
                  "soft": sum(int(cf[name].id.get_storage_size()) for name in ("soft_probs", "soft_ids")
                              if name in h.datasets())}
        stats = read_stats(cf.file)
    compact_bytes = os.path.getsize(path)
    return {**_counts(h, full_images), **_sizes(h, full_images, compact_bytes, stored),
            **_yardsticks(h, compact_bytes, stats)}


def _counts(h, full_images: int) -> dict:
    """Images and patches kept, and the codec."""
    return {
        "images": h.num_images,
        "train_images": full_images,
        "selected_share": h.num_images / max(full_images, 1),
        "num_patches": h.num_patches,
        "kept_patches": h.kept_patches,
        "codec": h.codec,
        "quality": h.quality if not codecs.is_lossless(h.codec) else None,
    }


def _sizes(h, full_images: int, compact_bytes: int, stored: dict) -> dict:
    """The file's bytes (and its image and soft-label datasets' as stored) against raw pixels."""
    image_bytes = h.image_size * h.image_size * h.channels
    full_raw = full_images * image_bytes
    kept_patch_raw = h.num_images * h.kept_patches * h.patch_size * h.patch_size * h.channels
    return {
        "compact_bytes": compact_bytes,
        "patches_stored_bytes": stored["images"],
        "soft_label_bytes": stored["soft"],  # the soft labels' datasets as stored (version 3); counted in compact_bytes
        "soft_label_share": stored["soft"] / max(compact_bytes, 1),
        "bytes_per_image": compact_bytes / max(h.num_images, 1),
        "kept_raw_bytes": h.num_images * image_bytes,
        "kept_patch_raw_bytes": kept_patch_raw,
        "full_raw_bytes": full_raw,
        "compression_ratio": full_raw / max(compact_bytes, 1),  # how many times smaller than the full set
        "compact_share": compact_bytes / max(full_raw, 1),
        "kept_pixel_share": kept_patch_raw / max(full_raw, 1),
    }


def _yardsticks(h, compact_bytes: int, stats: dict) -> dict:
    """The file against a JPEG q90 copy and the source files, and how exact the kept pixels are (`stats`)."""
    jpeg, source = stats.get("jpeg_q90_bytes"), stats.get("source_bytes")
    return {
        "jpeg_q90_bytes": jpeg,
        "vs_jpeg_q90": compact_bytes / jpeg if jpeg else None,
        "source_bytes": source,
        "source_bytes_how": stats.get("source_bytes_how"),
        "vs_source": compact_bytes / source if source else None,
        "kept_pixel_psnr": stats.get("kept_pixel_psnr"),  # dB; None: the kept pixels read back exactly
        "lossless": codecs.is_lossless(h.codec),
    }
