"""The export (data/export/): the rebuilt compact set and the untouched test split, as other trainers read them.

The train split holds the exact pixels the train stage trains on: the fill cache of dq.mae.rebuilt, one fill
per compact store and MAE. The test split is the prepared test store, untouched (`export.test: skip` leaves
it out). Two layouts, `export.format`:

    imagefolder   train/<class folder>/<row>.png, test/<class folder>/<row>.png, dataset.json
                  (torchvision.datasets.ImageFolder, timm's folder datasets, Hugging Face
                  load_dataset("imagefolder", data_dir=...))
    webdataset    train-000000.tar, train-000001.tar, ..., test-000000.tar, ..., dataset.json; sample
                  `<row>` is `<row>.png`, `<row>.cls` (the class index, ASCII) and `<row>.json` (the row,
                  class, DQ bin and which patches the MAE filled); `export.shard_images` images a shard
                  (the webdataset package, timm's `wds/` datasets)

Names. `<row>` is the image's row in its prepared split, 8 digits (`00012345`): the provenance of each
image, and names sort in row order. A class folder is `<index>_<name>`, the index zero-padded to at least
3 digits, so that sorted folder names number the classes as dq does (ImageFolder and the others sort them),
and the name escaped: every byte outside `A-Z a-z 0-9 space . _ ( ) -` is percent-encoded (RFC 3986, as
urllib.parse.quote does), so `T-shirt/top` is `000_T-shirt%2Ftop`; `urllib.parse.unquote` gives the name
back, and dataset.json lists both.

Bytes. Every image is a PNG from dq.data.codec's encoder (lossless; a grey image is a 1-channel PNG, which
loaders converting to RGB give back as three equal channels, the dq pixels); a prepared test store of
PNG streams is copied stream for stream. Tar members are written in row order with mtime 0, uid and gid 0,
no user or group names and mode 0644, so equal inputs give byte-identical exports. The whole folder is
written to a temporary name and renamed into place (dq.core.io.atomic_path), dataset.json last: an export that
was killed half-way never sits at data/export.

Soft labels. When the compact store holds a teacher's soft labels (format version 3, dq.labels.soft), the
export carries them as float32 probabilities at the store's temperature, dense over the C classes:

    imagefolder   soft_labels.npy [N, C], row i the soft label of line i of soft_labels.txt (the image's
                  path under the export, e.g. train/000_T-shirt%2Ftop/00000012.png); the lines are in
                  ImageFolder's order, so row i is also `ImageFolder(export / "train").samples[i]`'s.
                  With `labels.views: 2`, soft_labels_flip.npy [N, C] holds the mirror images' labels.
    webdataset    `<row>.soft` in every train sample: the bytes of an .npy file of float32 [C]
                  (`np.load(io.BytesIO(sample["soft"]))`), and `<row>.soft_flip` with two views

dataset.json: `format` "dq-export", `version`, `layout`, the classes with their folders, per split the
image count (per class), shards or folder, and the files it came from (the compact store's and the MAE's
path, bytes and MD5, which equal their entries in dvc.lock's directory listings), the params that made the
compact store, the fill cache key, and the figures a user asks for: stored bytes of the compact store, the
share of the original training set it keeps (images and bytes), and the train stage's top-1 on it.
"""
from __future__ import annotations

import io
import json
import tarfile
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from dq.data import codec as codecs
from dq.core.errors import DQError
from dq.core.io import atomic_path, file_digest, read_json
from dq.params import ExportParams
from dq.data.prepared import Store
from dq.mae.rebuilt import RebuiltSet
from dq.data.rows import Rows, StoreRows

FORMAT = "dq-export"
VERSION = 1
ROW_DIGITS = 8
SAFE = " ._()-"  # besides letters and digits, left as they are in class folder names
ENCODE_BATCH = 64  # images per DataLoader item: PNG encoding runs in the workers
JSON_NAME = "dataset.json"


def class_folders(classes: list[str]) -> list[str]:
    """`<index>_<escaped name>` for every class, in class order (which is also their sorted order)."""
    width = max(3, len(str(len(classes) - 1)))
    return [f"{k:0{width}d}_{urllib.parse.quote(name, safe=SAFE)}" for k, name in enumerate(classes)]


def row_name(row: int) -> str:
    return f"{int(row):0{ROW_DIGITS}d}"


def md5_of(path: Path) -> str:
    """A file's MD5, as DVC records it in dvc.lock (and in a directory output's listing)."""
    return file_digest(path, "md5")


@dataclass
class Split:
    """One split to export: its images (a row source), labels, prepared rows, and per-image metadata."""

    name: str
    images: Rows
    labels: np.ndarray  # int64 [n]
    rows: np.ndarray  # int64 [n]: the rows in the prepared split (the names)
    extra: list[dict] | None = None  # per image, written beside it in a webdataset sample
    store: Store | None = None  # a prepared store of PNG streams: copied as they are
    soft: np.ndarray | None = None  # float32 [n, V, C]: the soft labels of each view (train split, version 3 stores)


class _PngBatches(torch.utils.data.Dataset):
    """`ds[batch]` -> the PNG bytes of the split's images at positions `batch`, made in a DataLoader worker."""

    def __init__(self, split: Split):
        self.split = split

    def __len__(self) -> int:
        return len(self.split.labels)

    def __getitem__(self, positions):
        s = self.split
        if s.store is not None and s.store.index.codec == "png":
            return [bytes(stream) for stream in s.store.streams(s.rows[positions])]
        return [codecs.encode(image, "png") for image in s.images.read(positions)]


def _as_is(batch):
    return batch


def png_streams(split: Split, num_workers: int) -> Iterator[tuple[int, bytes]]:
    """(position, PNG bytes) of every image of `split`, in order, encoded by `num_workers` DataLoader workers."""
    from tqdm import tqdm

    n = len(split.labels)
    batches = [np.arange(s, min(s + ENCODE_BATCH, n)) for s in range(0, n, ENCODE_BATCH)]
    loader = torch.utils.data.DataLoader(_PngBatches(split), batch_size=None, sampler=batches,
                                         num_workers=num_workers, collate_fn=_as_is,
                                         prefetch_factor=2 if num_workers else None)
    for positions, streams in zip(batches, tqdm(loader, desc=f"export {split.name}", unit="batch", leave=False)):
        yield from zip(positions.tolist(), streams)


def train_split(rebuilt: RebuiltSet) -> Split:
    """The rebuilt compact set, with each image's bin and filled patches for the webdataset metadata."""
    num_patches = rebuilt.keep.shape[1]
    extra = [{"row": int(r), "bin": int(b), "num_patches": num_patches, "filled_patches": np.flatnonzero(~k).tolist()}
             for r, b, k in zip(rebuilt.indices, rebuilt.bins, rebuilt.keep)]
    soft = None
    if rebuilt.soft is not None:
        everyone = np.arange(len(rebuilt.labels))
        soft = np.stack([rebuilt.soft.targets(everyone, torch.full((len(everyone),), bool(v))).numpy()
                         for v in range(rebuilt.soft.views)], axis=1)
    return Split("train", rebuilt.images, rebuilt.labels, rebuilt.indices, extra, soft=soft)


SOFT_VIEWS = ("soft", "soft_flip")  # the names of view 0 and view 1 (file stems, webdataset extensions)


def _npy_bytes(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, np.ascontiguousarray(array), allow_pickle=False)
    return out.getvalue()


def write_soft_labels(folder: Path, split: Split, folders: list[str]) -> dict:
    """soft_labels.npy [N, C] (and soft_labels_flip.npy) with soft_labels.txt, rows in ImageFolder's order."""
    order = np.lexsort((split.rows, split.labels))  # class folder, then file name: what ImageFolder lists
    paths = [f"{split.name}/{folders[split.labels[i]]}/{row_name(split.rows[i])}.png" for i in order]
    (folder / "soft_labels.txt").write_text("".join(p + "\n" for p in paths))
    files = []
    for v in range(split.soft.shape[1]):
        name = "soft_labels.npy" if v == 0 else "soft_labels_flip.npy"
        (folder / name).write_bytes(_npy_bytes(split.soft[order, v].astype(np.float32)))
        files.append(name)
    return {"files": files, "list": "soft_labels.txt"}


def test_split(store: Store) -> Split:
    rows = np.arange(len(store), dtype=np.int64)
    return Split("test", StoreRows(store), store.labels(), rows, [{"row": int(r)} for r in rows], store)


def write_imagefolder(folder: Path, split: Split, folders: list[str], num_workers: int) -> dict:
    for name in folders:
        (folder / split.name / name).mkdir(parents=True)
    for i, stream in png_streams(split, num_workers):
        (folder / split.name / folders[split.labels[i]] / f"{row_name(split.rows[i])}.png").write_bytes(stream)
    return {"folder": split.name}


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = len(data), 0, 0o644, 0, 0, "", ""
    tar.addfile(info, io.BytesIO(data))


def write_webdataset(folder: Path, split: Split, classes: list[str], shard_images: int, num_workers: int) -> dict:
    shards, tar = [], None
    for i, stream in png_streams(split, num_workers):
        if i % shard_images == 0:
            if tar is not None:
                tar.close()
            shards.append(f"{split.name}-{len(shards):06d}.tar")
            tar = tarfile.open(folder / shards[-1], "w", format=tarfile.USTAR_FORMAT)
        key, label = row_name(split.rows[i]), int(split.labels[i])
        meta = {"class": classes[label], "label": label, **(split.extra[i] if split.extra else {})}
        _tar_add(tar, f"{key}.png", stream)
        _tar_add(tar, f"{key}.cls", str(label).encode())
        _tar_add(tar, f"{key}.json", json.dumps(meta, sort_keys=True).encode())
        if split.soft is not None:
            for v in range(split.soft.shape[1]):
                _tar_add(tar, f"{key}.{SOFT_VIEWS[v]}", _npy_bytes(split.soft[i, v].astype(np.float32)))
    if tar is not None:
        tar.close()
    return {"shards": shards}


def write_export(folder: str | Path, rebuilt: RebuiltSet, test: Store | None, params: ExportParams, *,
                 info: dict, num_workers: int = 0) -> dict:
    """Write data/export/ atomically (see the module docstring); returns dataset.json's contents.

    `test` is the prepared test store (None: `export.test: skip`); `info` is merged into dataset.json (the
    sources, params and figures the stage knows).
    """
    classes = list(rebuilt.header.classes)
    if test is not None and list(test.classes) != classes:
        raise DQError(f"{rebuilt.compact_path}: its classes differ from the prepared test set's; rerun the "
                      "pipeline from compress")
    folders = class_folders(classes)
    splits = [train_split(rebuilt)] + ([test_split(test)] if test is not None else [])
    record = {"format": FORMAT, "version": VERSION, "layout": params.format, "classes": classes,
              "class_folders": folders if params.format == "imagefolder" else None,
              "image_shape": list(rebuilt.header.image_shape), "splits": {"test": None}, **info}
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        for split in splits:
            if params.format == "imagefolder":
                where = write_imagefolder(tmp, split, folders, num_workers)
            else:
                where = write_webdataset(tmp, split, classes, params.shard_images, num_workers)
            per_class = np.bincount(split.labels, minlength=len(classes)).tolist()
            record["splits"][split.name] = {"images": int(len(split.labels)), "per_class": per_class, **where}
        record["soft_labels"] = _soft_record(tmp, splits[0], folders, rebuilt, params.format)
        (tmp / JSON_NAME).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")  # last: the export is whole
    return record


def _soft_record(folder: Path, split: Split, folders: list[str], rebuilt: RebuiltSet, layout: str) -> dict | None:
    """Write the train split's soft labels beside an image folder; what dataset.json says of them (None: none)."""
    if split.soft is None:
        return None
    spec = rebuilt.header.soft
    where = write_soft_labels(folder, split, folders) if layout == "imagefolder" else {
        "entries": [SOFT_VIEWS[v] for v in range(split.soft.shape[1])]}
    return {"temperature": spec.temperature, "k": spec.k, "bits": spec.bits, "views": spec.views,
            "num_classes": int(split.soft.shape[2]), **where}


def read_export_info(folder: str | Path) -> dict:
    """dataset.json of an export, checked to be one."""
    path = Path(folder) / JSON_NAME
    record = read_json(path, "export")
    if record.get("format") != FORMAT or record.get("version") != VERSION:
        raise DQError(f"{path}: not a {FORMAT} version {VERSION} description")
    return record
