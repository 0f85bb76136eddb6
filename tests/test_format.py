"""The compact HDF5 format: round trip, layout, codecs (version 2), version 1 files, validation errors,
the Dataset, the CLI, the stage."""
from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml

from dq.data import codec as codecs
from dq.compact import cli as compact_cli
from dq.compact import dataset as compact_dataset
from dq.compact import metrics as compact_metrics
from dq.compact import reader as compact_reader
from dq.compact import schema as compact_schema
from dq.compact import writer as compact_writer
from dq.patches import grid
from dq.patches.cam import keep_mask
from dq.core.errors import DQError
from dq.data.prepared import Prepared
from dq.data.prepared_writer import write_prepared
from tests.test_bad_input import flip_stream_byte

ROOT = Path(__file__).resolve().parents[1]


def smooth_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """uint8 [n, size, size, 3] images with structure (so gzip has something to do)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    freq = rng.uniform(1, 4, (n, 1, 1, 3))
    phase = rng.uniform(0, 6.3, (n, 1, 1, 3))
    waves = np.sin(freq * (xx[None, ..., None] * 6 + yy[None, ..., None] * 3) + phase)
    return (127.5 + 127 * waves).astype(np.uint8)


def make_compact(path: Path, n: int = 40, size: int = 16, p: int = 4, drop: float = 0.25, seed: int = 0,
                 codec: str = "raw", quality: int = 90, store_scores: bool = True, images=None):
    rng = np.random.default_rng(seed)
    images = smooth_images(n, size, seed) if images is None else images
    scores = rng.random((n, (size // p) ** 2), dtype=np.float32)
    keep = keep_mask(scores, drop)
    labels = rng.integers(0, 3, n).astype(np.int64)
    indices = np.sort(rng.choice(10 * n, n, replace=False)).astype(np.int64)
    bins = rng.integers(0, 5, n).astype(np.int32)
    header = compact_schema.Header(image_size=size, patch_size=p, channels=3, drop=drop, ratio=0.1,
                        classes=["a", "b", "c"], source="test", params={"patches": {"drop": drop}},
                        codec=codec, quality=quality, store_scores=store_scores)
    compact_writer.write_compact(path, header, compact_writer.KeptImages(images, keep, labels, indices, bins, scores))
    return dict(images=images, keep=keep, labels=labels, indices=indices, bins=bins, scores=scores)


@pytest.fixture()
def compact(tmp_path):
    path = tmp_path / "dataset.h5"
    return path, make_compact(path)


# ---------------------------------------------------------------------------------------------------
# Patches and the round trip


def test_extract_patches_follow_raster_order_of_kept_positions():
    image = np.arange(4 * 4 * 1, dtype=np.uint8).reshape(1, 4, 4, 1)
    keep = np.array([[False, True, True, False]])  # top-right, bottom-left
    patches = grid.extract_patches(image, keep, 2)
    assert patches.shape == (1, 2, 2, 2, 1)
    assert patches[0, 0, ..., 0].tolist() == [[2, 3], [6, 7]]
    assert patches[0, 1, ..., 0].tolist() == [[8, 9], [12, 13]]
    rebuilt = grid.assemble(patches, keep, (2, 2))[0, ..., 0]
    assert rebuilt.tolist() == [[0, 0, 2, 3], [0, 0, 6, 7], [8, 9, 0, 0], [12, 13, 0, 0]]


def test_round_trip_is_pixel_exact_on_kept_patches(compact):
    path, src = compact
    data = compact_reader.read_compact(path)
    h = data.header
    assert (h.image_size, h.patch_size, h.channels, h.num_images) == (16, 4, 3, 40)
    assert (h.num_patches, h.kept_patches, h.classes, h.source) == (16, 12, ["a", "b", "c"], "test")
    pixel_keep = src["keep"].reshape(40, 4, 4).repeat(4, axis=1).repeat(4, axis=2)
    images = data.images()
    np.testing.assert_array_equal(images[pixel_keep], src["images"][pixel_keep])
    assert (images[~pixel_keep] == 0).all()
    for name in ("keep", "labels", "indices", "bins"):
        np.testing.assert_array_equal(getattr(data, name), src[name])
        assert getattr(data, name).dtype == compact_schema.DATASETS[name]
    assert data.scores.dtype == np.float16  # version 2
    np.testing.assert_array_equal(data.scores, src["scores"].astype(np.float16))


def test_root_attributes_are_exactly_the_design(compact):
    path, _ = compact
    with h5py.File(path, "r") as f:
        assert set(f.attrs) == set(compact_cli.ATTRS) | {"stats"}
        assert f.attrs["format"] == "dq-compact" and int(f.attrs["schema_version"]) == 2
        assert f.attrs["codec"] == "raw" and int(f.attrs["quality"]) == 90
        assert f.attrs["grid"].tolist() == [4, 4] and int(f.attrs["num_patches"]) == 16
        assert int(f.attrs["kept_patches"]) == 12 and float(f.attrs["drop"]) == 0.25
        assert json.loads(f.attrs["classes"]) == ["a", "b", "c"]
        assert json.loads(f.attrs["params"]) == {"patches": {"drop": 0.25}}
        assert set(f) == set(compact_schema.DATASETS) and f["scores"].dtype == np.float16


def test_writing_twice_gives_identical_bytes(tmp_path):
    digests = []
    for name in ("one.h5", "two.h5"):
        make_compact(tmp_path / name, n=300, size=32)
        digests.append(hashlib.sha256((tmp_path / name).read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_chunks_compression_and_checksums(tmp_path):
    path = tmp_path / "big.h5"
    make_compact(path, n=600, size=32)  # patches are 1.4 MB raw: several chunks
    with h5py.File(path, "r") as f:
        for name in f:
            d = f[name]
            assert d.compression == "gzip" and d.shuffle and d.fletcher32, name
            assert d.chunks[1:] == d.shape[1:], f"{name} is chunked along N only"
            chunk_bytes = d.dtype.itemsize * math.prod(d.chunks)
            if d.nbytes >= compact_schema.CHUNK_MIN:
                assert compact_schema.CHUNK_MIN <= chunk_bytes <= compact_schema.CHUNK_MAX, (name, d.chunks)
            else:
                assert d.chunks == d.shape, name
            assert d.dtype.byteorder in "<|="  # little-endian or single byte
        assert f["patches"].chunks[0] < 600 and f["patches"].id.get_storage_size() < f["patches"].nbytes


def test_chunk_shape_splits_rows_larger_than_the_maximum():
    assert compact_writer.chunk_shape((10, 2048, 2048, 3), 1) == (1, 10, 2048, 3)  # a row is 12 MiB; 60 KiB chunks
    assert compact_writer.chunk_shape((5,), 8) == (5,)
    assert compact_writer.chunk_shape((100_000, 64), 4) == (256, 64)


# ---------------------------------------------------------------------------------------------------
# The streaming writer


def _stream(path: Path, src: dict, codec: str, batch: int, n: int, size: int = 32) -> dict:
    header = compact_schema.Header(image_size=size, patch_size=4, channels=3, drop=0.25, ratio=0.1, classes=["a", "b", "c"],
                        source="test", params={"patches": {"drop": 0.25}}, codec=codec, quality=90, store_scores=True)
    with compact_writer.CompactWriter(path, header, n) as writer:
        for start in range(0, n, batch):
            rows = slice(start, start + batch)
            writer.add(src["images"][rows], src["keep"][rows], src["labels"][rows], src["indices"][rows],
                       src["bins"][rows], src["scores"][rows])
    return writer.stats


@pytest.mark.parametrize("codec", ["raw", "webp-lossless", "jpeg"])
def test_streaming_writer_gives_the_whole_array_file_whatever_the_batches(tmp_path, codec, monkeypatch):
    """Batches of 1, 7 or all 70 images, and spool copies in blocks of one chunk or of the whole: the file
    write_compact writes from whole arrays, byte for byte, and nothing left beside it."""
    whole = tmp_path / "whole.h5"
    src = make_compact(whole, n=70, size=32, codec=codec)
    expected, stats = whole.read_bytes(), compact_schema.read_stats(h5py.File(whole, "r"))
    decoded = compact_reader.read_compact(whole)
    for block in (compact_schema.SPOOL_BLOCK_BYTES, 1000):  # 1000: each block one chunk (raw) or 1000 bytes (streams)
        monkeypatch.setattr(compact_writer, "SPOOL_BLOCK_BYTES", block)
        for batch in (1, 7, 70):
            path = tmp_path / f"streamed-{block}-{batch}.h5"
            assert _stream(path, src, codec, batch, 70) == stats
            assert path.read_bytes() == expected, (block, batch)
    ours = compact_reader.read_compact(path)
    for name in ("patches", "keep", "labels", "indices", "bins", "scores"):
        np.testing.assert_array_equal(getattr(ours, name), getattr(decoded, name))
    compact_reader.validate(path)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_streaming_writer_stats_are_those_of_the_whole_set(tmp_path):
    """The kept-pixel PSNR from summed integer squared errors equals the whole-array figure exactly."""
    images = grey_and_colour(40, 16)
    src = make_compact(tmp_path / "whole.h5", codec="jpeg", images=images)
    with h5py.File(tmp_path / "whole.h5", "r") as f:
        stats = compact_schema.read_stats(f)
    decoded = compact_reader.read_compact(tmp_path / "whole.h5").images()
    masks = masks_of(src["keep"])
    assert stats["kept_pixel_psnr"] == compact_metrics.kept_pixel_psnr(images, decoded, masks)
    diff = decoded[masks].astype(np.float64) - images[masks]
    assert stats["kept_pixel_psnr"] == 10 * math.log10(255 ** 2 / np.mean(diff * diff))  # main's formula
    assert stats["jpeg_q90_bytes"] == compact_metrics.jpeg_reference_bytes(images)


def _bad_batches(kind: str):
    def run(path, src, n=20):
        header = compact_schema.Header(image_size=16, patch_size=4, channels=3, drop=0.25, ratio=0.1, classes=["a", "b", "c"],
                            source="test", codec="webp-lossless")
        with compact_writer.CompactWriter(path, header, n) as writer:
            for start in range(0, n if kind != "short" else n - 5, 5):
                rows = slice(start, start + 5)
                keep = src["keep"][rows].copy()
                if kind == "keep" and start == 10:
                    keep[2, :] = True
                if kind == "interrupted" and start == 10:
                    raise KeyboardInterrupt
                writer.add(src["images"][rows], keep, src["labels"][rows], src["indices"][rows], src["bins"][rows],
                           src["scores"][rows])
    return run


@pytest.mark.parametrize("kind, error, message", [
    ("keep", DQError, r"out\.h5: keep row 12 has 16 True values; expected exactly K = 12"),
    ("short", ValueError, "15 images added, the writer was opened for 20"),
    ("interrupted", KeyboardInterrupt, ""),
])
def test_a_failed_stream_leaves_the_old_file_and_no_temporaries(tmp_path, kind, error, message):
    src = make_compact(tmp_path / "out.h5", n=20)
    before = (tmp_path / "out.h5").read_bytes()
    with pytest.raises(error, match=message):
        _bad_batches(kind)(tmp_path / "out.h5", src)
    assert (tmp_path / "out.h5").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.h5"]


def test_a_killed_writers_spool_is_swept_by_the_next_write(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    for suffix in ("", ".part"):
        (tmp_path / f".out.h5.tmp-{gone.pid}{suffix}").write_bytes(b"half")
    make_compact(tmp_path / "out.h5", n=4)
    assert [p.name for p in tmp_path.iterdir()] == ["out.h5"]


# ---------------------------------------------------------------------------------------------------
# Version 2: codec streams


def masks_of(keep: np.ndarray, size: int = 16, p: int = 4) -> np.ndarray:
    return grid.pixel_keep(keep, p, size)


def grey_and_colour(n: int = 40, size: int = 16) -> np.ndarray:
    """Half the images grey (equal channels: 1-channel streams), half colour tinted like photos (the
    channels of smooth_images are independent waves, all chroma, which JPEG's 4:2:0 cannot keep)."""
    luma = smooth_images(n, size)[..., :1].astype(np.float64)
    tint = np.array([1.0, 0.85, 0.7])
    images = np.where(np.arange(n)[:, None, None, None] < n // 2, luma, luma * tint + 20)
    return np.clip(images, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("codec", ["png", "webp-lossless"])
def test_lossless_codecs_read_back_the_kept_pixels_exactly(tmp_path, codec):
    path = tmp_path / f"{codec}.h5"
    src = make_compact(path, codec=codec, images=grey_and_colour())
    data = compact_reader.read_compact(path)
    assert (data.header.codec, data.header.version) == (codec, 2)
    images, masks = data.images(), masks_of(src["keep"])
    np.testing.assert_array_equal(images[masks], src["images"][masks])
    assert (images[~masks] == 0).all()
    assert compact_metrics.storage_metrics(path, 400)["kept_pixel_psnr"] is None  # exact
    with h5py.File(path, "r") as f:
        assert "patches" not in f and f["streams"].dtype == np.uint8 and f["offsets"].shape == (41,)


@pytest.mark.parametrize("codec, quality, min_psnr", [("jpeg", 90, 31.0), ("jpeg", 75, 27.0), ("webp", 90, 31.0)])
def test_lossy_codecs_report_the_kept_pixel_psnr(tmp_path, codec, quality, min_psnr):
    path = tmp_path / f"{codec}.h5"
    src = make_compact(path, codec=codec, quality=quality, images=grey_and_colour())
    data = compact_reader.read_compact(path)
    masks = masks_of(src["keep"])
    diff = data.images()[masks].astype(float) - src["images"][masks]
    psnr = 10 * math.log10(255 ** 2 / np.mean(diff ** 2))
    metrics = compact_metrics.storage_metrics(path, 400)
    assert metrics["kept_pixel_psnr"] == pytest.approx(psnr) and psnr > min_psnr
    assert metrics["quality"] == quality and not metrics["lossless"]
    assert (data.images()[~masks] == 0).all()


@pytest.mark.parametrize("codec", ["png", "webp-lossless", "webp", "jpeg"])
def test_codec_files_are_byte_identical_for_equal_inputs(tmp_path, codec):
    digests = [hashlib.sha256(make_compact(tmp_path / name, codec=codec, n=60, size=32) and
                              (tmp_path / name).read_bytes()).hexdigest() for name in ("one.h5", "two.h5")]
    assert digests[0] == digests[1]


def test_streams_are_ordinary_image_files_of_the_padded_image(tmp_path):
    from PIL import Image
    import io
    import zlib

    path = tmp_path / "png.h5"
    src = make_compact(path, codec="png", images=grey_and_colour())
    with h5py.File(path, "r") as f:
        streams, offsets, crcs = f["streams"][:], f["offsets"][:], f["crc32"][:]
    for row in (0, 39):  # grey, then colour
        body = streams[offsets[row]:offsets[row + 1]].tobytes()
        assert zlib.crc32(body) == crcs[row] and body[:8] == b"\x89PNG\r\n\x1a\n"
        pixels = np.asarray(Image.open(io.BytesIO(body)))
        mask = masks_of(src["keep"])[row]
        assert body == codecs.encode_dropped(src["images"][row], mask, "png")
        expected = codecs.zero_pad(src["images"][row], mask)  # png's one candidate
        assert pixels.ndim == (2 if row == 0 else 3)  # a grey image is a 1-channel stream
        np.testing.assert_array_equal(pixels if pixels.ndim == 3 else np.repeat(pixels[..., None], 3, 2), expected)


def test_scores_can_be_left_out(tmp_path):
    path = tmp_path / "noscores.h5"
    make_compact(path, codec="webp-lossless", store_scores=False)
    with h5py.File(path, "r") as f:
        assert "scores" not in f
    assert compact_reader.read_compact(path).scores is None and not compact_reader.validate(path).store_scores


@pytest.mark.parametrize("codec", ["webp-lossless", "jpeg", "raw"])
def test_dataset_decodes_codec_streams_the_same_in_workers(tmp_path, codec):
    path = tmp_path / f"{codec}.h5"
    make_compact(path, codec=codec, images=grey_and_colour())
    images = compact_reader.read_compact(path).images()
    ds = compact_dataset.CompactDataset(path)
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(ds, batch_size=16, num_workers=workers)
        x = torch.cat([b[0] for b in loader]).permute(0, 2, 3, 1).numpy()
        np.testing.assert_array_equal(x, images)
    scattered = ds.__getitems__([39, 5, 0, 5])
    for i, sample in zip([39, 5, 0, 5], scattered):
        np.testing.assert_array_equal(sample[0].permute(1, 2, 0).numpy(), images[i])


def test_jpeg_is_read_with_the_batch_decoder(tmp_path):
    path = tmp_path / "jpeg.h5"
    src = make_compact(path, codec="jpeg", images=grey_and_colour())
    with h5py.File(path, "r") as f:
        offsets, streams = f["offsets"][:], f["streams"][:]
    batch = codecs.decode_jpeg_batch([streams[offsets[i]:offsets[i + 1]] for i in range(40)], (16, 16, 3))
    batch[~masks_of(src["keep"])] = 0
    np.testing.assert_array_equal(compact_reader.read_compact(path).images(), batch)


def _garbage_stream_with_good_crc(path: Path, row: int) -> None:
    """Image `row`'s stream replaced by bytes of the same length that are no image, its crc32 updated."""
    import zlib

    with h5py.File(path, "r+") as f:
        a, b = int(f["offsets"][row]), int(f["offsets"][row + 1])
        garbage = np.full(b - a, 7, np.uint8)
        f["streams"][a:b] = garbage
        f["crc32"][row] = zlib.crc32(garbage.tobytes())


@pytest.mark.parametrize("codec", ["png", "webp-lossless", "webp", "jpeg"])
@pytest.mark.parametrize("damage, message", [(flip_stream_byte, r"image row 7: its \d+-byte stream fails its crc32"),
                                             (_garbage_stream_with_good_crc, r"image row 7: not a valid \S+ stream")])
def test_a_corrupt_stream_is_one_line_naming_the_file_and_the_row(tmp_path, codec, damage, message):
    path = tmp_path / f"{codec}.h5"
    make_compact(path, codec=codec)
    compact_reader.validate(path)
    damage(path, 7)
    for read in (compact_reader.validate, compact_reader.read_compact, lambda p: compact_dataset.CompactDataset(p).__getitems__(list(range(16)))):
        with pytest.raises(DQError, match=message) as info:
            read(path)
        assert "\n" not in str(info.value) and str(info.value).startswith(str(path))
    compact_dataset.CompactDataset(path).__getitems__([8, 9])  # the other rows still read


def test_describe_shows_the_codec_and_the_figures(tmp_path, capsys):
    path = tmp_path / "jpeg.h5"
    make_compact(path, codec="jpeg", quality=75)
    compact_cli.main(["describe", str(path)])
    out = capsys.readouterr().out
    psnr = compact_metrics.storage_metrics(path, 40)["kept_pixel_psnr"]
    for text in ("codec           jpeg", "codec: jpeg quality 75", "bytes per kept image", f"PSNR {psnr:.2f} dB",
                 "vs a JPEG q90 copy", "streams", "crc32"):
        assert text in out, text


# ---------------------------------------------------------------------------------------------------
# Version 1 files

FIXTURE_V1 = ROOT / "tests/fixtures/compact_v1.h5"


def test_a_version_1_file_still_reads():
    from tests.fixtures.make_compact_v1 import v1_fixture_inputs

    images, keep, labels, indices, bins, scores = v1_fixture_inputs()
    header = compact_reader.validate(FIXTURE_V1)
    assert (header.version, header.codec, header.num_images) == (1, "raw", 6)
    data = compact_reader.read_compact(FIXTURE_V1)
    masks = masks_of(keep)
    np.testing.assert_array_equal(data.images()[masks], images[masks])
    for name, value in dict(keep=keep, labels=labels, indices=indices, bins=bins, scores=scores).items():
        np.testing.assert_array_equal(getattr(data, name), value)
    assert data.scores.dtype == np.float32
    x = torch.stack([s[0] for s in compact_dataset.CompactDataset(FIXTURE_V1).__getitems__(list(range(6)))])
    np.testing.assert_array_equal(x.permute(0, 2, 3, 1).numpy(), data.images())
    assert "version 1" in compact_cli.describe(FIXTURE_V1)


def test_a_version_1_reader_refuses_a_version_2_file(tmp_path, monkeypatch):
    path = tmp_path / "v2.h5"
    make_compact(path, codec="png")
    with h5py.File(path, "r") as f:
        assert int(f.attrs["schema_version"]) == 2
    monkeypatch.setattr(compact_schema, "SCHEMA_VERSION", 1)  # the version 1 reader's check, unchanged since
    with pytest.raises(DQError, match=r"schema_version 2 is newer than this reader \(version 1\); update dq"):
        compact_reader.validate(path)


# ---------------------------------------------------------------------------------------------------
# Validation: every damage gives one line naming the file and the problem


def _flip_bytes_in_a_chunk(path: Path, name: str) -> None:
    with h5py.File(path, "r") as f:
        info = f[name].id.get_chunk_info(0)
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset + info.size // 2)
        chunk = bytearray(fh.read(4))
        fh.seek(info.byte_offset + info.size // 2)
        fh.write(bytes(b ^ 0xFF for b in chunk))


def _set_attr(name, value):
    def damage(path):
        with h5py.File(path, "r+") as f:
            f.attrs[name] = value
    return damage


def _delete(name):
    def damage(path):
        with h5py.File(path, "r+") as f:
            del f[name]
    return damage


def _wrong_length(path):
    with h5py.File(path, "r+") as f:
        del f["indices"]
        f.create_dataset("indices", data=np.arange(39, dtype=np.int64))


def _keep_row_off(path):
    with h5py.File(path, "r+") as f:
        row = f["keep"][3]
        row[np.flatnonzero(row)[0]] = False
        f["keep"][3] = row


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


DAMAGE = {
    "wrong format": (_set_attr("format", "something-else"), r"format = 'something-else'; expected 'dq-compact'"),
    "newer schema": (_set_attr("schema_version", np.int64(4)), r"schema_version 4 is newer than this reader"),
    "unknown codec": (_set_attr("codec", "avif"), r"attribute codec = 'avif'; expected one of raw, png"),
    "missing dataset": (_delete("bins"), r"missing dataset 'bins'"),
    "missing attribute": (lambda p: _delete_attr(p, "grid"), r"missing root attribute 'grid'"),
    "shapes disagree": (_wrong_length, r"dataset 'indices' is int64 \[39\]; expected int64 \[40\]"),
    "derived attribute": (_set_attr("kept_patches", np.int64(11)), r"kept_patches = 11 disagrees"),
    "keep row count": (_keep_row_off, r"keep row 3 has 11 True values; expected exactly K = 12"),
    "checksum": (lambda p: _flip_bytes_in_a_chunk(p, "patches"), r"dataset 'patches'.* fails its checksum"),
    "truncated": (_truncate, r"not a readable HDF5 file, truncated or damaged"),
}


def _delete_attr(path, name):
    with h5py.File(path, "r+") as f:
        del f.attrs[name]


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_files_fail_validation_with_one_line(compact, case):
    path, _ = compact
    compact_reader.validate(path)  # intact first
    damage, message = DAMAGE[case]
    damage(path)
    with pytest.raises(DQError, match=message) as info:
        compact_reader.validate(path)
    text = str(info.value)
    assert "\n" not in text and text.startswith(str(path))
    with pytest.raises(DQError):
        compact_reader.read_compact(path)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(DQError, match=r"nothing.h5: file not found"):
        compact_reader.validate(tmp_path / "nothing.h5")


# ---------------------------------------------------------------------------------------------------
# The torch Dataset


def _read_all(ds, workers: int):
    loader = torch.utils.data.DataLoader(ds, batch_size=7, num_workers=workers, shuffle=False)
    images, keeps, labels = zip(*loader)
    return torch.cat(images), torch.cat(keeps), torch.cat(labels)


def test_dataset_yields_zeroed_images_masks_and_labels(compact):
    path, src = compact
    ds = compact_dataset.CompactDataset(path)
    assert ds._cf is None  # no handle is held after __init__
    image, keep, label = ds[5]
    assert image.dtype == torch.uint8 and image.shape == (3, 16, 16)
    assert keep.dtype == torch.bool and keep.shape == (16,)
    assert label.dtype == torch.int64 and int(label) == src["labels"][5]
    expected = grid.assemble(grid.extract_patches(src["images"][5:6], src["keep"][5:6], 4), src["keep"][5:6], (4, 4))
    np.testing.assert_array_equal(image.numpy().transpose(1, 2, 0), expected[0])
    assert torch.equal(keep, torch.from_numpy(src["keep"][5]))
    as_float = compact_dataset.CompactDataset(path, as_float=True)[5][0]
    assert as_float.dtype == torch.float32 and torch.allclose(as_float, image.float() / 255)
    with pytest.raises(IndexError):
        ds[40]


def test_dataset_reads_the_same_with_two_workers(compact):
    path, _ = compact
    ds = compact_dataset.CompactDataset(path)
    ds[0]  # a handle opened in the parent must not leak into the workers
    serial, parallel = _read_all(ds, 0), _read_all(ds, 2)
    for a, b in zip(serial, parallel):
        assert torch.equal(a, b)
    assert len(serial[0]) == 40
    one_by_one = [ds[i] for i in range(40)]  # the loaders above fetch whole batches (__getitems__)
    for part, whole in zip(zip(*one_by_one), serial):
        assert torch.equal(torch.stack(part), whole)
    scattered = ds.__getitems__([39, 5, 0, 5])  # unsorted, repeated, sparse: read row by row
    for i, sample in zip([39, 5, 0, 5], scattered):
        assert all(torch.equal(a, b) for a, b in zip(sample, one_by_one[i]))


def test_dataset_checks_the_header_first(compact):
    path, _ = compact
    _set_attr("schema_version", np.int64(9))(path)
    with pytest.raises(DQError, match="schema_version 9 is newer"):
        compact_dataset.CompactDataset(path)


# ---------------------------------------------------------------------------------------------------
# The command line


def test_describe_lists_attributes_counts_and_bytes(compact, capsys):
    path, _ = compact
    compact_cli.main(["describe", str(path)])
    out = capsys.readouterr().out
    for word in ("dq-compact", "kept_patches", "40 images", "patches", "scores", "stored/raw", "a=", "total"):
        assert word in out
    compact_cli.main(["validate", str(path)])
    assert "valid dq-compact version 2 (raw): 40 images" in capsys.readouterr().out


@pytest.mark.parametrize("module", ["dq.compact"])
def test_cli_reports_damage_as_one_error_line(compact, module):
    path, _ = compact
    _flip_bytes_in_a_chunk(path, "scores")
    result = subprocess.run([sys.executable, "-m", module, "validate", str(path)], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "checksum" in lines[0]


# ---------------------------------------------------------------------------------------------------
# The compress stage, in-process, on a tiny prepared + selection + features set


def _tiny_pipeline(root: Path, n: int = 24, indices: np.ndarray | None = None, shard_images: int = 10000,
                   **patches) -> Path:
    """Inputs of the compress stage under root/data, params in root/params.yaml: `n` prepared images of
    3 classes (32 px), every other one selected unless `indices` says otherwise; `patches` overrides."""
    from dq.features.file import Features, write_features
    from dq.labels.teacher import probe_logits, write_logits

    classes = ["zero", "one", "two"]
    labels = np.arange(n) % 3
    write_prepared(root / "data/prepared/train", Prepared(smooth_images(n, 32, 3), labels, classes, "synthetic"),
                   shard_images=shard_images)
    indices = np.arange(0, n, 2, dtype=np.int64) if indices is None else np.asarray(indices, np.int64)
    (root / "data/selection").mkdir(parents=True)
    np.save(root / "data/selection/indices.npy", indices)
    np.save(root / "data/selection/bins.npy", (np.arange(n) % 4).astype(np.int32))
    rng = np.random.default_rng(0)
    d = 512  # resnet10t's features
    features = Features(
        embedding=rng.normal(size=(n, d)).astype(np.float32), logit_grad=None,
        probe_weight=rng.normal(size=(3, d)).astype(np.float32) * 0.05, probe_bias=np.zeros(3, np.float32),
        kind="embedding", backbone="resnet10t", weights="none", input_size=32, classes=classes,
        probe_train_accuracy=0.0)
    write_features(root / "data/features/train.h5", features)
    # the default stores soft labels: the probe teacher's logits, as the teacher stage writes them
    write_logits(root / "data/teacher/logits.h5", {"logits": probe_logits(features)}, num_images=n, classes=classes,
                 kind="probe", test_top1=None)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(source="synthetic", image_size=32)
    params["features"].update(backbone="resnet10t", weights="none", input_size=32)
    params["patches"].update({"drop": 0.25, "patch_size": 4, "cam_layer": "auto", "batch_size": 8, **patches})
    params["runtime"].update(device="cpu")
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def test_compress_stage_writes_a_valid_file_metrics_and_a_figure(tmp_path):
    from stages import compress

    root = _tiny_pipeline(tmp_path)
    argv = ["--params", str(root / "params.yaml"), "--data", str(root / "data")]
    compress.main(argv)
    out = root / "data/compact/dataset.h5"
    first = hashlib.sha256(out.read_bytes()).hexdigest()
    header = compact_reader.validate(out)
    assert (header.num_images, header.kept_patches, header.num_patches) == (12, 48, 64)
    data = compact_reader.read_compact(out)
    prepared_images = smooth_images(24, 32, 3)
    np.testing.assert_array_equal(data.indices, np.arange(0, 24, 2))
    np.testing.assert_array_equal(data.bins, np.arange(0, 24, 2) % 4)
    np.testing.assert_array_equal(data.labels, np.arange(0, 24, 2) % 3)
    pixel_keep = data.keep.reshape(12, 8, 8).repeat(4, axis=1).repeat(4, axis=2)
    np.testing.assert_array_equal(data.images()[pixel_keep], prepared_images[data.indices][pixel_keep])
    assert data.scores is None and not header.store_scores  # the default: nothing reads the scores
    scored_root = _tiny_pipeline(tmp_path / "scored", store_scores=True)
    compress.main(["--params", str(scored_root / "params.yaml"), "--data", str(scored_root / "data")])
    scored = compact_reader.read_compact(scored_root / "data/compact/dataset.h5")
    np.testing.assert_array_equal(scored.keep, data.keep)
    # float16 scores round monotonically: every kept score is still >= every dropped one
    scores = scored.scores.astype(np.float32)
    assert scored.scores.dtype == np.float16
    assert all(scores[i][scored.keep[i]].min() >= scores[i][~scored.keep[i]].max() for i in range(12))
    assert header.codec == "webp-lossless"  # the default
    assert json.loads(json.dumps(header.params))["features"] == {"backbone": "resnet10t", "weights": "none",
                                                                  "input_size": 32}

    metrics = json.loads((root / "data/compact_metrics.json").read_text())
    assert metrics["compact_bytes"] == out.stat().st_size
    assert metrics["full_raw_bytes"] == 24 * 32 * 32 * 3 and metrics["kept_raw_bytes"] == 12 * 32 * 32 * 3
    assert metrics["kept_pixel_share"] == pytest.approx(0.5 * 0.75)
    assert metrics["compression_ratio"] == pytest.approx(metrics["full_raw_bytes"] / metrics["compact_bytes"], rel=1e-5)
    jpeg = sum(len(codecs.encode(image, "jpeg", 90)) for image in prepared_images[data.indices])
    assert metrics["jpeg_q90_bytes"] == jpeg and metrics["vs_jpeg_q90"] == pytest.approx(out.stat().st_size / jpeg, rel=1e-5)
    assert metrics["bytes_per_image"] == pytest.approx(out.stat().st_size / 12, rel=1e-5)
    assert metrics["kept_pixel_psnr"] is None and metrics["lossless"] and metrics["codec"] == "webp-lossless"
    assert metrics["source_bytes"] is None and "synthetic" in metrics["source_bytes_how"]
    assert (root / "data/compact_plots/patches.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    compress.main(argv)  # same inputs, same bytes
    assert hashlib.sha256(out.read_bytes()).hexdigest() == first


def test_compress_stage_gives_the_same_bytes_with_dataloader_workers(tmp_path):
    """runtime.num_workers 0 or 2, over 5 shards: the same compact file, metrics and figure."""
    from stages import compress

    outputs = []
    for workers in (0, 2):
        root = _tiny_pipeline(tmp_path / str(workers), shard_images=5, batch_size=4, scorer="pixel-std")
        params = yaml.safe_load((root / "params.yaml").read_text())
        params["runtime"]["num_workers"] = workers
        (root / "params.yaml").write_text(yaml.safe_dump(params))
        compress.main(["--params", str(root / "params.yaml"), "--data", str(root / "data")])
        outputs.append([(root / "data" / name).read_bytes() for name in
                        ("compact/dataset.h5", "compact_metrics.json", "compact_plots/patches.png")])
    assert outputs[0] == outputs[1]


def test_compress_stage_refuses_features_from_another_backbone(tmp_path):
    from stages import compress

    root = _tiny_pipeline(tmp_path)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["features"]["input_size"] = 64
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(DQError, match=r"features/train.h5: made with features.input_size = 32"):
        compress.main(["--params", str(root / "params.yaml"), "--data", str(root / "data")])


def test_source_bytes_estimates_the_share_of_the_source_files(tmp_path):
    import gzip

    from dq.params import DataParams
    from stages.compress import source_bytes

    idx = tmp_path / "fm" / "train-images-idx3-ubyte.gz"
    idx.parent.mkdir()
    with gzip.open(idx, "wb") as fh:  # IDX header: magic 0x00000803, 10 images of 28x28
        fh.write(bytes([0, 0, 8, 3]) + (10).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + bytes(7840))
    size = idx.stat().st_size
    assert source_bytes(DataParams(root=str(idx.parent)), 4) == (round(4 * size / 10), f"4 x mean bytes per image of {idx}")
    folder = tmp_path / "img" / "train"
    for name, n in (("a", 100), ("b", 300)):
        (folder / name).mkdir(parents=True)
        (folder / name / "0.png").write_bytes(bytes(n))
    (folder / "a" / "notes.txt").write_text("not an image")
    assert source_bytes(DataParams(source="imagefolder", root=str(tmp_path / "img")), 3)[0] == 600
    assert source_bytes(DataParams(source="synthetic"), 3)[0] is None


@pytest.mark.parametrize("codec", ["v1", "raw", "png", "webp-lossless", "jpeg"])
def test_the_reader_in_format_md_reads_what_dq_reads(tmp_path, codec):
    """docs/FORMAT.md's plain h5py + Pillow reader, run as printed, against dq's reader."""
    import re

    code = re.search(r"### Reading either version\n\n```python\n(.*?)```", (ROOT / "docs/FORMAT.md").read_text(), re.S)
    namespace: dict = {}
    exec(code.group(1), namespace)
    path = FIXTURE_V1 if codec == "v1" else tmp_path / f"{codec}.h5"
    if codec != "v1":
        make_compact(path, codec=codec, images=grey_and_colour())
    ours = compact_reader.read_compact(path).images()
    theirs = namespace["read_images"](path)
    if codec == "jpeg":  # Pillow's libjpeg may round the IDCT differently from torchvision's by one level
        assert np.abs(theirs.astype(int) - ours).max() <= 1
    else:
        np.testing.assert_array_equal(theirs, ours)
