"""The four extension axes: a scorer, a selection method, a codec and a data source registered from this file
alone go through params validation and the real stage entry points (prepare, features, select, compress); a
selection method with a parameter of its own too."""
from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np
import pytest
import yaml

from dq.data import codec as codecs
from dq.data.codec import CODECS, Codec
from dq.data.sources import SOURCES, ArrayItems, Source
from dq.core.errors import DQError
from dq.params import params_from_dict
from dq.patches.scorers import SCORERS, PatchScorer
from dq.select import METHODS, select_indices
from dq.select.method_params import MethodParams, Rule, param
from tests.pipeline_repo import tiny_params

CLASSES = ["dark", "light"]


def toy_images(params, split: str) -> Source:
    """Stripes: dark images are class 0, light ones class 1."""
    n = params.synthetic_train if split == "train" else params.synthetic_test
    s = params.image_size
    labels = np.arange(n, dtype=np.int64) % 2
    rng = np.random.default_rng(0 if split == "train" else 1)
    images = (rng.integers(0, 100, (n, s, s, 3)) + 120 * labels[:, None, None, None]).astype(np.uint8)
    images[:, ::4] = 255
    return Source(CLASSES, "toy-stripes", labels, s, ArrayItems(images))


def first_rows(features, labels, ratio, seed, params, **context):
    """Keeps the first round(ratio * N) rows: a method without bins, params or features."""
    n = len(labels)
    return np.full(n, -1, np.int32), np.arange(round(ratio * n), dtype=np.int64)


class BrightFirst(PatchScorer):
    """Keeps the brightest patches."""

    name = "toy-bright"

    def maps(self, images, labels, positions=None):
        return images.mean(axis=3).astype(np.float32) / 255.0


def bmp_encode(image, quality):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="BMP")
    return buf.getvalue()


def bmp_decode(buf, shape):
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(bytes(buf))).convert("RGB")).reshape(shape).copy()


@pytest.fixture()
def toys():
    SOURCES.register("toy-stripes", source_bytes=lambda params, n: (n * 100, f"{n} x 100 toy bytes"))(toy_images)
    METHODS.register("toy-first")(first_rows)
    SCORERS.register("toy-bright")(BrightFirst)
    CODECS.register("toy-bmp")(Codec(encode=bmp_encode, decode=bmp_decode))
    yield
    for registry, name in ((SOURCES, "toy-stripes"), (METHODS, "toy-first"), (SCORERS, "toy-bright"),
                           (CODECS, "toy-bmp")):
        registry.unregister(name)


def test_params_name_every_registered_entry_and_refuse_others(toys):
    raw = tiny_params({"data": {"source": "toy-stripes"}, "select": {"method": "toy-first"},
                       "patches": {"scorer": "toy-bright", "codec": "toy-bmp"}})
    params = params_from_dict(raw)
    assert (params.data.source, params.select.method, params.patches.scorer) == ("toy-stripes", "toy-first", "toy-bright")
    with pytest.raises(DQError, match=r"select.method = 'toy-last' is not allowed; expected one of dq, graphcut, "
                                      r"random, ccs, d2, moderate, dq-ccs, toy-first$"):
        params_from_dict({**raw, "select": {"method": "toy-last"}})
    with pytest.raises(DQError, match=r"data.source = 'x' is not allowed; expected one of .*synthetic, toy-stripes$"):
        params_from_dict({**raw, "data": {**raw["data"], "source": "x"}})
    with pytest.raises(DQError, match=r"patches.codec = 'gif' is not allowed; expected one of .*jpeg, toy-bmp$"):
        params_from_dict({**raw, "patches": {**raw["patches"], "codec": "gif"}})


def test_a_toy_of_every_axis_runs_through_the_stage_entry_points(toys, tmp_path):
    from dq.compact.reader import read_compact, validate
    from dq.data.prepared import read_prepared
    from stages import compress, features, prepare, select, teacher

    raw = tiny_params({"data": {"source": "toy-stripes", "synthetic_train": 40, "synthetic_test": 8},
                       "select": {"method": "toy-first"}, "ratio": 0.25, "teacher": {"kind": "probe"},
                       "scores": {"dynamics": "runs"},
                       "patches": {"scorer": "toy-bright", "codec": "toy-bmp", "drop": 0.25}})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    argv = ["--params", str(tmp_path / "params.yaml"), "--data", str(tmp_path / "data")]
    for stage in (prepare, features, teacher, select, compress):
        stage.main(argv)
    prepared = read_prepared(tmp_path / "data" / "prepared" / "train")
    assert prepared.classes == CLASSES and prepared.source == "toy-stripes"
    header = validate(tmp_path / "data" / "compact" / "dataset.h5")
    assert (header.codec, header.num_images) == ("toy-bmp", 10)
    stored = read_compact(tmp_path / "data" / "compact" / "dataset.h5")
    np.testing.assert_array_equal(stored.indices, np.arange(10))  # the toy method's first rows
    pixels = stored.images()
    brightness = prepared.images[:10].mean(axis=3).reshape(10, 4, 4, 4, 4).mean(axis=(2, 4)).reshape(10, -1)
    for row in range(10):  # the toy scorer kept the brightest patches, the toy codec gave them back exactly
        kept = stored.keep[row]
        assert brightness[row][kept].min() >= brightness[row][~kept].max()
        mask = kept.reshape(4, 4).repeat(4, 0).repeat(4, 1)
        np.testing.assert_array_equal(pixels[row][mask], prepared.images[row][mask])
    assert header.params["data"]["source"] == "toy-stripes"
    assert codecs.decode_batch([bmp_encode(prepared.images[0], 90)], "toy-bmp", (16, 16, 3)).shape == (1, 16, 16, 3)


# ------------------------------------------------------------------- a selection method with its own parameter

@dataclass(frozen=True)
class StrideParams(MethodParams):
    stride: int = param(2, Rule(lambda v: isinstance(v, int) and v >= 1, "an integer >= 1"))


def every_kth(features, labels, ratio, seed, params, **context):
    """Keeps every `stride`-th row from the first, round(ratio * N) of them: a method with a parameter."""
    keep = np.arange(0, len(labels), params.stride)[:round(ratio * len(labels))]
    return np.full(len(labels), -1, np.int32), keep.astype(np.int64)


@pytest.fixture()
def strided():
    METHODS.register("toy-every-kth", params=StrideParams)(every_kth)
    yield
    METHODS.unregister("toy-every-kth")


def test_a_method_s_own_parameter_is_validated_with_the_params(strided):
    raw = tiny_params({"select": {"method": "toy-every-kth", "stride": 3}})
    params = params_from_dict(raw)
    assert params.select.method_params["stride"] == 3
    assert params.provenance("select")["select"]["stride"] == 3
    assert params_from_dict(tiny_params()).select.method_params["stride"] == 2  # its default when left out
    with pytest.raises(DQError, match=r"^params: select.stride = 0 is not allowed; expected an integer >= 1$"):
        params_from_dict(tiny_params({"select": {"stride": 0}}))
    with pytest.raises(DQError, match=r"^params: select.stride = 2.5 is not allowed; expected an integer$"):
        params_from_dict(tiny_params({"select": {"stride": 2.5}}))
    with pytest.raises(DQError, match=r"^params: unknown key select.strides; allowed keys in select: method, "
                                      r"num_bins, .*, gamma_reverse, stride$"):
        params_from_dict(tiny_params({"select": {"strides": 3}}))


def test_a_method_with_its_own_parameter_runs_through_the_select_stage(strided, tmp_path):
    import yaml

    from stages.select import main
    from tests.test_select import _write_stage_inputs

    path, labels = _write_stage_inputs(tmp_path, False)
    raw = yaml.safe_load(path.read_text())
    raw["select"] |= {"method": "toy-every-kth", "stride": 4}
    path.write_text(yaml.safe_dump(raw))
    main(["--params", str(path), "--data", str(tmp_path)])
    np.testing.assert_array_equal(np.load(tmp_path / "selection" / "indices.npy"), np.arange(0, 120, 4))
    summary = json.loads((tmp_path / "selection" / "summary.json").read_text())
    assert summary["params"]["select"]["stride"] == 4 and summary["method"] == "toy-every-kth"


def test_a_shared_key_has_one_type_and_one_default():
    @dataclass(frozen=True)
    class OtherBeta(MethodParams):
        beta: float = param(0.5, Rule(lambda v: True, "anything"))

    with pytest.raises(ValueError, match=r"select.beta: 'toy-beta' declares <class 'float'> = 0.5, but 'ccs' "
                                         r"declares <class 'float'> = 0.1"):
        METHODS.register("toy-beta", params=OtherBeta)(every_kth)
    assert "toy-beta" not in METHODS


def test_a_method_without_bins_must_return_bins_of_minus_one():
    def binned(features, labels, ratio, seed, params, **context):
        return np.zeros(len(labels), np.int32), np.arange(2, dtype=np.int64)

    METHODS.register("toy-binned")(binned)
    try:
        with pytest.raises(DQError, match=r"^select.method = 'toy-binned' returned bins other than -1 but is "
                                          r"registered without makes_bins"):
            select_indices("toy-binned", np.ones((8, 2)), np.zeros(8, np.int64), 0.25, 0)
    finally:
        METHODS.unregister("toy-binned")
