"""params.yaml validation: one bad value per key gives one line naming the key, the value and what is allowed."""
from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dq.params import Params, ParamError, load_params, params_from_dict

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_repo_params_load_and_match_dataclass_defaults(raw):
    params = load_params(ROOT / "params.yaml")
    assert params == Params()  # the dataclasses document the same defaults as params.yaml
    assert params.ratio == raw["ratio"] and params.seed == raw["seed"]
    assert params.data.source == "fashion-mnist"
    # every key of params.yaml is a field, and every field is in params.yaml: the file documents them all
    for section in ("data", "features", "scores", "select", "patches", "mae", "train", "teacher", "labels", "export", "runtime"):
        assert set(raw[section]) == set(getattr(params, section).as_plain()), section


BAD_VALUES = [
    ("ratio", 0, "(0, 1]"), ("ratio", -0.1, "(0, 1]"), ("ratio", 1.5, "(0, 1]"), ("ratio", "lots", "a number"),
    ("seed", 1.5, "an integer"), ("seed", True, "an integer"),
    ("data.source", "mnist", "one of"), ("data.root", 3, "a string or null"),
    ("data.download", "yes", "true or false"), ("data.image_size", 4, "[8, 1024]"),
    ("data.train_limit", 0, "positive integer"), ("data.test_limit", -5, "positive integer"),
    ("data.skip_bad", 1, "true or false"), ("data.synthetic_classes", 1, ">= 2"),
    ("data.synthetic_train", 1, ">= synthetic_classes"), ("data.synthetic_test", 0, "positive"),
    ("data.codec", "gif", "one of raw, png, webp-lossless, webp, jpeg"), ("data.quality", 0, "[1, 100]"),
    ("data.quality", 101, "[1, 100]"), ("data.quality", 9.5, "an integer"), ("data.shard_images", 0, "positive"),
    ("features.backbone", "no_such_net", "timm model name"), ("features.weights", "", "builtin"),
    ("features.kind", "pixels", "one of"), ("features.input_size", 8, "[16, 1024]"),
    ("features.batch_size", 0, "positive"),
    ("select.method", "kmeans", "one of"), ("select.num_bins", 0, "positive"),
    ("select.lam", -1.0, "> 0"), ("select.per_class", "no", "true or false"),
    ("select.precision", "float16", "one of float64, float32"),
    ("select.score", "loss", "one of aum, el2n, forgetting"), ("select.beta", 1.0, "[0, 1)"),
    ("select.strata", 0, "positive"), ("select.k", 0, "positive"), ("select.gamma", -1.0, ">= 0"),
    ("select.gamma_reverse", -1.0, ">= 0"),
    ("scores.model", "no_such_net", "smallnet or a timm model name"), ("scores.seeds", 0, "positive"),
    ("scores.steps", 0, "positive"), ("scores.batch_size", 1, ">= 2"), ("scores.lr", 0.0, "> 0"),
    ("scores.el2n_step", 0, "[1, scores.steps]"), ("scores.k", 0, "positive"), ("scores.dynamics", "both", "teacher | runs"),
    ("patches.drop", 1.0, "[0, 1)"), ("patches.drop", -0.1, "[0, 1)"), ("patches.patch_size", 0, "positive"),
    ("patches.patch_size", 5, "divisor of data.image_size"), ("patches.cam_layer", 3, "a string"),
    ("patches.batch_size", 0, "positive"), ("patches.scorer", "saliency", "one of pixel-std, random, gradcam++, gradcam++-flat-first"),
    ("patches.batch_size", 0, "positive"),
    ("patches.codec", "avif", "one of raw, png, webp-lossless, webp, jpeg"), ("patches.codec", 3, "a string"),
    ("patches.quality", 0, "[1, 100]"), ("patches.quality", 101, "[1, 100]"), ("patches.quality", 9.5, "an integer"),
    ("patches.store_scores", "yes", "true or false"),
    ("mae.arch", 1, "a string"), ("mae.checkpoint", 2, "a string or null"), ("mae.input_size", 4, ">= 8"),
    ("mae.mask_ratio", 1.0, "(0, 1)"), ("mae.epochs", 0, "positive"), ("mae.batch_size", 0, "positive"),
    ("mae.lr", 0.0, "> 0"), ("mae.weight_decay", -1.0, ">= 0"), ("mae.warmup_epochs", -1, ">= 0"),
    ("mae.norm_pix_loss", "x", "true or false"), ("mae.eval_images", 0, "positive"),
    ("mae.resume", 0, "true or false"),
    ("train.model", "no_such_net", "timm model name"), ("train.input", "half", "one of"),
    ("train.epochs", 0, "positive"), ("train.batch_size", 0, "positive"), ("train.lr", 0.0, "> 0"),
    ("train.momentum", 1.0, "[0, 1)"), ("train.weight_decay", -1.0, ">= 0"),
    ("train.crop_padding", -1, ">= 0"), ("train.hflip", "no", "true or false"), ("train.resume", 2, "true or false"),
    ("train.steps", 0, "positive integer or null"), ("train.steps", 2.5, "an integer or null"),
    ("train.eval_every", -3, "positive integer or null"),
    ("train.model", "no_such_net", "smallnet or a timm model name"), ("train.nesterov", "yes", "true or false"),
    ("train.schedule", "step", "one of onecycle, cosine"), ("train.warmup", 1.0, "[0, 1)"),
    ("train.label_smoothing", -0.1, "[0, 1)"), ("train.ema", 1.0, "[0, 1)"), ("train.tta", "crops", "one of flip, none"),
    ("train.distill_weight", 1.5, "[0, 1]"), ("teacher.kind", "oracle", "one of trained, probe, checkpoint"),
    ("teacher.seed", "zero", "an integer"),
    ("teacher.steps", 0, "positive"), ("teacher.checkpoint", 3, "a string or null"),
    ("labels.soft", "yes", "true or false"), ("labels.k", 0, "positive"), ("labels.bits", 4, "one of 16, 8"),
    ("labels.temperature", 0.0, "> 0"), ("labels.views", 3, "1 or 2"),
    ("export.format", "tfrecord", "one of imagefolder, webdataset"), ("export.test", "keep", "one of copy, skip"),
    ("export.shard_images", 0, "positive integer"),
    ("runtime.device", "tpu", "one of"), ("runtime.nproc", 0, "positive"), ("runtime.num_workers", -1, ">= 0"),
    ("runtime.threads", -1, ">= 0"),
]


def _with(raw: dict, dotted: str, value) -> dict:
    out = copy.deepcopy(raw)
    *parents, leaf = dotted.split(".")
    node = out
    for p in parents:
        node = node[p]
    node[leaf] = value
    return out


def test_bad_values_cover_every_key(raw):
    keys = {k for k, _, _ in BAD_VALUES}
    expected = {k for k in raw if not isinstance(raw[k], dict)}
    expected |= {f"{s}.{k}" for s, v in raw.items() if isinstance(v, dict) for k in v}
    assert expected <= keys, f"keys without a bad-value test: {sorted(expected - keys)}"


MODEL_NAMES = ("features.backbone", "scores.model", "train.model")  # timm's to judge: Params.check_model_names


@pytest.mark.parametrize("key,value,expected", BAD_VALUES, ids=[f"{k}={v!r}" for k, v, _ in BAD_VALUES])
def test_bad_value_names_key_value_and_what_is_allowed(raw, key, value, expected):
    with pytest.raises(ParamError) as info:
        changed = _with(raw, key, value)
        if key == "features.backbone":
            changed["features"]["weights"] = "none"  # builtin weights exist for one backbone only: a rule of its own
        params = params_from_dict(changed, "params.yaml")
        if key in MODEL_NAMES and value == "no_such_net":
            params.check_model_names("params.yaml")
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"params.yaml: {key} = {value!r}"), msg
    assert expected in msg, msg


def test_unknown_keys_are_errors(raw):
    with pytest.raises(ParamError, match=r"unknown key select\.bins; allowed keys in select: method"):
        params_from_dict(_with(raw, "select.bins", 3), "params.yaml")
    with pytest.raises(ParamError, match="unknown key ratios"):
        params_from_dict({**raw, "ratios": 0.1}, "params.yaml")


def test_section_must_be_a_mapping(raw):
    with pytest.raises(ParamError, match="select must be a mapping"):
        params_from_dict({**raw, "select": [1, 2]}, "params.yaml")


def test_yaml12_floats_written_by_dvc_exp_are_read_as_numbers(raw):
    params = params_from_dict(_with(raw, "mae.lr", "1e-4"), "p")
    assert params.mae.lr == pytest.approx(1e-4)
    assert params_from_dict({**raw, "ratio": 1}, "p").ratio == 1.0


def test_load_params_errors_name_the_file(tmp_path):
    with pytest.raises(ParamError, match="nope.yaml: cannot read"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("ratio: [unclosed\n")
    with pytest.raises(ParamError, match=r"bad.yaml: not valid YAML at line \d"):
        load_params(bad)


def test_imagefolder_needs_a_root(raw):
    data = {**raw["data"], "source": "imagefolder", "root": None}
    with pytest.raises(ParamError, match="data.root = None"):
        params_from_dict({**raw, "data": data}, "p")


@pytest.mark.parametrize("name", ["cifar10", "imagenet"])
def test_scale_configs_are_valid_params_files(name):
    params = load_params(ROOT / "configs" / f"{name}.yaml")
    assert params.select.method_params["num_bins"] == 10
    assert params.mae.arch == "mae_vit_large_patch16" and params.mae.input_size == 224
    if name == "cifar10":  # the paper's CIFAR-10 recipe
        t = params.train
        assert (t.model, t.epochs, t.lr, t.momentum, t.weight_decay, t.batch_size) == \
            ("resnet18", 200, 0.1, 0.9, 5.0e-4, 128)
        assert (t.steps, t.nesterov, t.schedule, t.label_smoothing, t.tta) == (None, False, "cosine", 0.0, "none")
        assert params.features.backbone == "resnet18"


def test_paper_config_is_the_paper_protocol_on_the_default_data(raw):
    """configs/paper.yaml: params.yaml but the train section (ResNet-18, 200 epochs, batch 16, plain SGD)."""
    paper = yaml.safe_load((ROOT / "configs" / "paper.yaml").read_text())
    assert {k: v for k, v in paper.items() if k != "train"} == {k: v for k, v in raw.items() if k != "train"}
    t = load_params(ROOT / "configs" / "paper.yaml").train
    assert (t.model, t.epochs, t.steps, t.batch_size, t.lr, t.nesterov, t.schedule, t.label_smoothing, t.tta) == \
        ("resnet18", 200, None, 16, 0.1, False, "cosine", 0.0, "none")


def test_loading_params_imports_neither_torch_nor_timm():
    """Loading params stays light (issue 37): the model names wait for the stages that build a model."""
    code = ("import sys; from dq.params import load_params; load_params('params.yaml'); "
            "print(sorted(m for m in ('torch', 'timm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
