"""Command line: `python -m dq.compact describe FILE` and `python -m dq.compact validate FILE`."""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import numpy as np

from dq.data import codec as codecs
from dq.compact.reader import open_compact, validate
from dq.compact.schema import ATTRS, ATTRS_V1, ATTRS_V3, FORMAT, read_stats
from dq.core.errors import run_cli


def _figure(value, fmt: str, none: str = "n/a", unit: str = "") -> str:
    return none if value is None else format(value, fmt) + unit


def describe(path: str | Path) -> str:
    """Attributes, codec, counts, bytes (stored vs raw) of each dataset, and the stats, as text."""
    path = Path(path)
    with open_compact(path) as cf:
        h = cf.header
        lines = _attribute_lines(cf, path) + [_count_line(cf)] + _dataset_lines(cf)
        image_name = "streams" if h.uses_streams else "patches"
        lines.append(f"kept images' raw pixels: {h.num_images * math.prod(h.image_shape):,} bytes; stored "
                     f"{image_name}: {cf[image_name].id.get_storage_size():,} bytes")
        stats = read_stats(cf.file)
    return "\n".join(lines + _stats_lines(h, os.path.getsize(path), stats))


def _attribute_lines(cf, path: Path) -> list[str]:
    """The file's version and size, then its root attributes in the version's order."""
    version = int(cf.file.attrs["schema_version"])
    lines = [f"{path}: {FORMAT} version {version}, {os.path.getsize(path):,} bytes", "attributes:"]
    for name in {1: ATTRS_V1, 2: ATTRS}.get(version, ATTRS_V3):
        value = cf.file.attrs[name]
        lines.append(f"  {name:15s} {value.tolist() if isinstance(value, np.ndarray) else value}")
    return lines


def _count_line(cf) -> str:
    h = cf.header
    labels = cf.read("labels")
    per_class = np.bincount(labels, minlength=len(h.classes)) if labels.size else []
    return (f"counts: {h.num_images} images, {h.num_patches} patches each ({h.grid[0]}x{h.grid[1]} of "
            f"{h.patch_size}x{h.patch_size}), {h.kept_patches} kept; per class: "
            + ", ".join(f"{c}={int(k)}" for c, k in zip(h.classes, per_class)))


def _dataset_lines(cf) -> list[str]:
    """A table of the datasets: dtype, shape, chunks, raw and stored bytes; then the totals."""
    lines = [f"{'dataset':10s} {'dtype':8s} {'shape':22s} {'chunks':22s} {'raw bytes':>12s} "
             f"{'stored':>12s} {'stored/raw':>10s}"]
    total_raw = total_stored = 0
    for name in cf.header.datasets():
        d = cf[name]
        raw, stored = d.dtype.itemsize * math.prod(d.shape), d.id.get_storage_size()
        total_raw, total_stored = total_raw + raw, total_stored + stored
        lines.append(f"{name:10s} {str(d.dtype):8s} {str(list(d.shape)):22s} {str(d.chunks):22s} "
                     f"{raw:12,d} {stored:12,d} {stored / max(raw, 1):10.3f}")
    lines.append(f"{'total':10s} {'':8s} {'':22s} {'':22s} {total_raw:12,d} {total_stored:12,d} "
                 f"{total_stored / max(total_raw, 1):10.3f}")
    return lines


def _stats_lines(h, size: int, stats: dict) -> list[str]:
    """The codec and kept-pixel PSNR, and the file against a JPEG q90 copy and the source files."""
    quality = "" if codecs.is_lossless(h.codec) else f" quality {h.quality}"
    psnr = stats.get("kept_pixel_psnr")
    psnr = "exact (lossless)" if codecs.is_lossless(h.codec) else _figure(psnr, ".2f") + " dB"
    jpeg, source = stats.get("jpeg_q90_bytes"), stats.get("source_bytes")
    return [f"codec: {h.codec}{quality}; {size / max(h.num_images, 1):,.0f} bytes per kept image; "
            f"kept-pixel PSNR {psnr}",
            f"file vs a JPEG q90 copy with nothing dropped ({_figure(jpeg, ',d')} bytes): "
            f"{_figure(size / jpeg if jpeg else None, '.3f', 'n/a', 'x')}; vs the source files "
            f"({_figure(source, ',d')} bytes, {stats.get('source_bytes_how') or 'not recorded'}): "
            f"{_figure(size / source if source else None, '.3f', 'n/a', 'x')}"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dq.compact", description="Inspect a dq compact HDF5 file.")
    parser.add_argument("command", choices=("describe", "validate"))
    parser.add_argument("file", type=Path)
    args = parser.parse_args(argv)
    if args.command == "describe":
        print(describe(args.file))
    else:
        header = validate(args.file)
        print(f"{args.file}: valid {FORMAT} version {header.version} ({header.codec}): {header.num_images} "
              f"images, {header.kept_patches} of {header.num_patches} patches kept")


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))
