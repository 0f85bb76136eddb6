"""The compact store: the HDF5 format, versions 1 to 3; write (version 2, or 3 with soft labels), read and validate all, a torch Dataset.

A compact file holds the images that selection kept, minus the patches that GradCAM++ scored lowest.
Its layout is fixed by docs/DESIGN.md and described for readers in other languages in docs/FORMAT.md:

    root attrs  format = "dq-compact", schema_version, image_size, patch_size, channels,
                grid [rows, cols], num_patches L, kept_patches K, drop, ratio, classes (JSON),
                source, params (JSON); version 2 adds codec, quality and stats (JSON, optional)
    keep        bool    [N, L]           True where a patch was kept; exactly K per row
    labels      int64   [N]
    indices     int64   [N]              row of each image in prepared/train.h5
    bins        int32   [N]
    scores      float32 [N, L]           version 1; version 2: float16, or absent (patches.store_scores)
  soft labels (version 3, root attrs soft_k, soft_bits, soft_temperature, soft_views; dq.labels.soft):
    soft_probs  float16|uint8 [N, V, k]  the teacher's k most probable classes per image and view
    soft_ids    uint8|uint16  [N, V, k]  their class ids; absent when k >= the number of classes
  codec raw (and every version 1 file):
    patches     uint8   [N, K, p, p, C]  kept patches, in raster order of their grid positions
  codec png | webp-lossless | webp | jpeg (version 2):
    streams     uint8   [B]              the images' codec streams (dq.data.codec), one after the other
    offsets     int64   [N + 1]          image n is streams[offsets[n]:offsets[n + 1]]
    crc32       uint32  [N]              zlib/PNG CRC-32 of each image's stream

Each stream is a whole image whose dropped patches were padded before encoding (dq.data.codec.encode_dropped:
the codec's candidate padding that gives the shortest stream); readers set them to zero again, so every
codec reads back as the raw layout does.
Every dataset but `streams` is chunked along N (10 KiB to 1 MiB a chunk), gzip-compressed after the
shuffle filter and checksummed (fletcher32); `streams` is contiguous and unfiltered (its bytes are
already compressed, and a C reader takes one image as a plain hyperslab), checked per image by crc32.
Equal inputs give byte-identical files: no timestamps, attributes and datasets always written in the
same order, the earliest HDF5 file format, deterministic encoders.

`CompactWriter` writes a file batch by batch (the compress stage streams its images into it);
`write_compact` is its whole-array form. Both give the same bytes for the same images.

The package, one module per concern: `schema` (constants, `Header`, the root attributes and their
checks), `writer` (`CompactWriter`, `write_compact`), `reader` (`open_compact`, `CompactFile`,
`read_compact`, `validate`), `metrics` (kept-pixel PSNR, `storage_metrics`), `dataset` (`CompactDataset`)
and `cli`. Import each name from its module: this package re-exports nothing.

Command line: `python -m dq.compact describe FILE` and `python -m dq.compact validate FILE`.
"""
