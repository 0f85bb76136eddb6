"""Typed parameters for every stage, read from params.yaml and validated once at load time.

Each section of params.yaml is one frozen dataclass. `load_params` checks every key: unknown keys,
wrong types and values outside the allowed range are errors whose single line names the key, the bad
value and what is allowed, e.g. ``params.yaml: ratio = 0 is not allowed; expected a number in (0, 1]``.

Names of the extension axes are checked against their registries (dq.core.registry), owned by the modules that
implement them: `data.source` (dq.data.sources.SOURCES), `select.method` (dq.select.methods.METHODS), `patches.scorer`
(dq.patches.scorers.SCORERS), `data.codec` and `patches.codec` (dq.data.codec.CODECS), `mae.arch`
(dq.mae.archs.MAE_ARCHS). None of them imports torch, so loading params stays light; the names that timm resolves
(features.backbone, and scores.model or train.model when not in dq.train.classifier.CLASSIFIERS) are checked by
`Params.check_model_names`, which the stages that build a model call. A rule lives in one function, which this module
calls: `ratio` in dq.select.sampling.ratio_problem (the public functions that take a ratio call it too), `patches.drop`
in dq.patches.grid.drop_problem. The `select` keys but `method` are declared by the selection methods' own params
dataclasses (SelectParams).
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dq.data.codec import codec_problem
from dq.data.sources import SOURCES
from dq.core.errors import DQError
from dq.mae.archs import MAE_ARCHS
from dq.patches.grid import drop_problem, grid_of
from dq.patches.scorers import SCORERS
from dq.select.methods import METHODS
from dq.select.sampling import ratio_problem

FEATURE_KINDS = ("embedding", "gradient")
TRAIN_INPUTS = ("compact", "selected", "full")
TRAIN_SCHEDULES = ("onecycle", "cosine")  # dq.train.schedule.learning_rate_factor
TRAIN_TTA = ("flip", "none")
EXPORT_FORMATS = ("imagefolder", "webdataset")  # export.format; dq.export.writer writes each
EXPORT_TESTS = ("copy", "skip")
DEVICES = ("auto", "cpu", "cuda")
TEACHER_KINDS = ("trained", "probe", "checkpoint")  # dq.labels.teacher
SCORE_DYNAMICS = ("teacher", "runs")  # dq.scores.dynamics: recorded during the teacher's training | own short runs
SOFT_BITS = (16, 8)  # dq.labels.soft: float16 | uint8 steps of 1/255


class ParamError(DQError):
    pass


def _fail(where: str, key: str, value: Any, expected: str) -> None:
    raise ParamError(f"{where}: {key} = {value!r} is not allowed; expected {expected}")


@dataclass(frozen=True)
class _Section:
    """Shared machinery: `check` is called by load_params with the file name and key prefix."""

    def check(self, where: str, prefix: str) -> None:  # pragma: no cover - overridden
        pass

    @classmethod
    def from_section(cls, raw: Any, where: str, prefix: str):
        """The section built from its mapping in the file, every key typed by its field (not yet checked)."""
        return _build(cls, raw, where, prefix)

    def as_plain(self) -> dict:
        """The section as plain data, key by key: what an output records of it (Params.provenance)."""
        return dataclasses.asdict(self)

    def _need(self, cond: bool, where: str, prefix: str, name: str, expected: str) -> None:
        if not cond:
            _fail(where, f"{prefix}{name}", getattr(self, name), expected)


@dataclass(frozen=True)
class DataParams(_Section):
    source: str = "fashion-mnist"
    root: str | None = None  # None: the built-in location of the source (Debian's fashion-mnist)
    download: bool = False  # cifar10/cifar100 only: let torchvision download into root
    image_size: int = 32  # side of the square uint8 images every later stage sees
    train_limit: int | None = 6000  # class-balanced subset of the training set; None: all
    test_limit: int | None = None
    skip_bad: bool = False  # imagefolder: skip unreadable images (counted) instead of stopping
    synthetic_classes: int = 4  # synthetic only
    synthetic_train: int = 200  # synthetic only: training images in all
    synthetic_test: int = 80
    codec: str = "png"  # how prepared images are stored (dq.data.codec): raw | png | webp-lossless | webp | jpeg
    quality: int = 90  # webp and jpeg only: 1..100
    shard_images: int = 10000  # images per prepared shard file

    def check(self, where, prefix):
        problem = codec_problem(self.codec, self.quality)
        if problem:  # "codec: one of ..." or "quality: an integer in [1, 100]"
            name, expected = problem.split(": ", 1)
            _fail(where, f"{prefix}{name}", getattr(self, name), expected)
        self._need(self.shard_images >= 1, where, prefix, "shard_images", "a positive integer")
        self._need(self.source in SOURCES, where, prefix, "source", SOURCES.expected())
        self._need(8 <= self.image_size <= 1024, where, prefix, "image_size", "an integer in [8, 1024]")
        for name in ("train_limit", "test_limit"):
            v = getattr(self, name)
            self._need(v is None or v >= 1, where, prefix, name, "a positive integer or null")
        self._need(self.synthetic_classes >= 2, where, prefix, "synthetic_classes", "an integer >= 2")
        self._need(self.synthetic_train >= self.synthetic_classes, where, prefix, "synthetic_train",
                   "an integer >= synthetic_classes")
        self._need(self.synthetic_test >= 1, where, prefix, "synthetic_test", "a positive integer")
        if self.source in SOURCES and SOURCES.get(self.source).needs_root:
            self._need(self.root is not None, where, prefix, "root", "the folder of class folders")


@dataclass(frozen=True)
class FeaturesParams(_Section):
    backbone: str = "efficientnet_lite0"  # a timm model name
    weights: str = "builtin"  # builtin | hub | none | path to a checkpoint
    kind: str = "embedding"  # embedding | gradient
    input_size: int = 128  # images are resized to this before the backbone
    batch_size: int = 64

    def check(self, where, prefix):
        self._need(self.kind in FEATURE_KINDS, where, prefix, "kind", f"one of {', '.join(FEATURE_KINDS)}")
        self._need(bool(self.weights), where, prefix, "weights", "builtin, hub, none or a checkpoint path")
        self._need(16 <= self.input_size <= 1024, where, prefix, "input_size", "an integer in [16, 1024]")
        self._need(self.batch_size >= 1, where, prefix, "batch_size", "a positive integer")
        self._check_backbone(where, prefix)

    def _check_backbone(self, where, prefix):
        # the name itself is timm's to judge: Params.check_model_names, when a stage builds a model
        if self.weights == "builtin" and self.backbone not in ("efficientnet_lite0", "tf_efficientnet_lite0"):
            _fail(where, f"{prefix}weights", self.weights,
                  "hub, none or a checkpoint path (builtin weights exist only for efficientnet_lite0)")


@dataclass(frozen=True)
class SelectParams(_Section):
    """`select.method` and the params of the selection methods: every other key of the section is a field of a
    registered method's params dataclass (dq.select.methods.METHODS, `params=`), typed by its annotation and
    checked by its rules; `method_params` holds every declared key, in registration order, defaults filled in."""

    method: str = "dq"  # a name in dq.select.methods.METHODS
    method_params: dict = field(default_factory=METHODS.param_defaults)  # key -> value: select_indices' **select_params

    @classmethod
    def from_section(cls, raw, where, prefix):
        declared = [(key, hint, field(default=default)) for key, (hint, default, _) in METHODS.declared().items()]
        shape = dataclasses.make_dataclass("select", [("method", str, field(default=cls.method)), *declared])
        values = dataclasses.asdict(_build(shape, raw, where, prefix))
        return cls(values.pop("method"), values)

    def check(self, where, prefix):
        self._need(self.method in METHODS, where, prefix, "method", METHODS.expected())
        try:
            METHODS.check_params(self.method_params)
        except DQError as exc:  # "select.beta = 2 is not allowed; expected ..."
            raise ParamError(f"{where}: {exc}") from None

    def as_plain(self) -> dict:
        return {"method": self.method, **self.method_params}


@dataclass(frozen=True)
class ScoresParams(_Section):
    """The scores stage (dq.scores.dynamics, dq.scores.file): every sample's training dynamics, recorded during the
    teacher's training (`dynamics: teacher`) or during short runs of train's recipe (`runs`: the fields
    model .. el2n_step), and the feature-only scores."""

    dynamics: str = "teacher"  # teacher: recorded while the teacher stage trains (teacher.kind trained) | runs
    model: str = "smallnet"  # dq.train.classifier.CLASSIFIERS or a timm model name, as train.model
    seeds: int = 2  # short runs averaged (run seeds 0 .. seeds-1, whatever the pipeline's seed)
    steps: int = 235  # optimizer steps per run, at least one epoch (5 epochs of 47 steps of 128 on the default 6,000 images)
    batch_size: int = 128
    lr: float = 0.2
    el2n_step: int = 47  # EL2N is scored after this step, on the un-augmented images
    k: int = 10  # neighbours of the kNN density

    def check(self, where, prefix):
        self._need(self.dynamics in SCORE_DYNAMICS, where, prefix, "dynamics", " | ".join(SCORE_DYNAMICS))
        for name in ("seeds", "steps", "k"):
            self._need(getattr(self, name) >= 1, where, prefix, name, "a positive integer")
        self._need(self.batch_size >= 2, where, prefix, "batch_size", "an integer >= 2")
        self._need(math.isfinite(self.lr) and self.lr > 0, where, prefix, "lr", "a finite number > 0")
        self._need(1 <= self.el2n_step <= self.steps, where, prefix, "el2n_step",
                   f"an integer in [1, scores.steps] (scores.steps = {self.steps})")


@dataclass(frozen=True)
class PatchesParams(_Section):
    drop: float = 0.25  # share of patches dropped from every kept image
    patch_size: int = 4
    scorer: str = "gradcam++-flat-first"  # gradcam++-flat-first | gradcam++ | pixel-std | random (see dq.patches.cam)
    cam_layer: str = "auto"  # a module name of the backbone, or auto (see dq.patches.cam)
    batch_size: int = 64
    codec: str = "webp-lossless"  # how the compact store keeps images (dq.data.codec.CODECS); lossless: today's pixels
    quality: int = 90  # lossy codecs (webp, jpeg) only
    store_scores: bool = False  # keep the patch scores (float16) in the compact store; nothing reads them

    def check(self, where, prefix):
        self._need(self.scorer in SCORERS, where, prefix, "scorer", SCORERS.expected())
        problem = codec_problem(self.codec, self.quality)
        if problem:
            name, expected = problem.split(": ", 1)
            self._need(False, where, prefix, name, expected)
        self._need(self.patch_size >= 1, where, prefix, "patch_size", "a positive integer")
        self._need(self.batch_size >= 1, where, prefix, "batch_size", "a positive integer")


@dataclass(frozen=True)
class MaeParams(_Section):
    arch: str = "mae_vit_tiny_patch4"  # a registered MAE architecture (dq.mae.archs.MAE_ARCHS)
    checkpoint: str | None = None  # path to a reference MAE checkpoint (key 'model'); None: train
    input_size: int = 32  # the MAE's image side; stored images are resized to it
    mask_ratio: float = 0.25  # we fill 25% drops; the reference trains at 0.75
    epochs: int = 10
    batch_size: int = 64
    lr: float = 2.0e-3
    weight_decay: float = 0.05
    warmup_epochs: int = 1
    norm_pix_loss: bool = False
    eval_images: int = 256  # held-out images for the PSNR/SSIM metrics
    resume: bool = False  # continue from data/mae_ckpt/last.pt (saved each epoch) when present

    def check(self, where, prefix):
        self._need(self.arch in MAE_ARCHS, where, prefix, "arch", MAE_ARCHS.expected())
        self._need(0.0 < self.mask_ratio < 1.0, where, prefix, "mask_ratio", "a number in (0, 1)")
        self._need(self.input_size >= 8, where, prefix, "input_size", "an integer >= 8")
        for name in ("epochs", "batch_size", "eval_images"):
            self._need(getattr(self, name) >= 1, where, prefix, name, "a positive integer")
        self._need(self.warmup_epochs >= 0, where, prefix, "warmup_epochs", "an integer >= 0")
        self._need(self.lr > 0, where, prefix, "lr", "a number > 0")
        self._need(self.weight_decay >= 0, where, prefix, "weight_decay", "a number >= 0")


@dataclass(frozen=True)
class TrainParams(_Section):
    model: str = "smallnet"  # dq.train.classifier.CLASSIFIERS or a timm model name; timm ResNets get a CIFAR stem on images <= 64 px
    input: str = "compact"  # compact | selected | full
    epochs: int = 15  # passes over the training set (the budget unless `steps` is set)
    steps: int | None = 700  # exactly this many optimizer steps whatever the set's size; epochs is then unused
    eval_every: int | None = None  # steps between test evaluations and checkpoints; None: an epoch, or the final step
    batch_size: int = 128
    lr: float = 0.2
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5.0e-4  # on weights only, never on biases or normalisation parameters
    schedule: str = "onecycle"  # onecycle: linear up over `warmup`, then linear down to 0 | cosine: from lr down to 0
    warmup: float = 0.2  # onecycle: the share of the steps spent warming up
    label_smoothing: float = 0.2
    ema: float = 0.0  # decay per step of an exponential average of the weights, scored and saved; 0: off
    tta: str = "flip"  # flip: score the average of the image's and its mirror's logits | none
    crop_padding: int = 2
    hflip: bool = True
    distill_weight: float = 0.9  # with a store's soft labels: (1 - w) hard-label loss + w T² KL to the teacher's
    resume: bool = False

    def check(self, where, prefix):
        self._need(self.input in TRAIN_INPUTS, where, prefix, "input", f"one of {', '.join(TRAIN_INPUTS)}")
        self._need(self.schedule in TRAIN_SCHEDULES, where, prefix, "schedule", f"one of {', '.join(TRAIN_SCHEDULES)}")
        self._need(self.tta in TRAIN_TTA, where, prefix, "tta", f"one of {', '.join(TRAIN_TTA)}")
        self._need(0 <= self.warmup < 1, where, prefix, "warmup", "a number in [0, 1)")
        self._need(0 <= self.label_smoothing < 1, where, prefix, "label_smoothing", "a number in [0, 1)")
        self._need(0 <= self.ema < 1, where, prefix, "ema", "a number in [0, 1) (0: off)")
        for name in ("epochs", "batch_size"):
            self._need(getattr(self, name) >= 1, where, prefix, name, "a positive integer")
        for name in ("steps", "eval_every"):
            value = getattr(self, name)
            self._need(value is None or value >= 1, where, prefix, name, "a positive integer or null")
        self._need(self.lr > 0, where, prefix, "lr", "a number > 0")
        self._need(0 <= self.momentum < 1, where, prefix, "momentum", "a number in [0, 1)")
        self._need(self.weight_decay >= 0, where, prefix, "weight_decay", "a number >= 0")
        self._need(self.crop_padding >= 0, where, prefix, "crop_padding", "an integer >= 0")
        self._need(0 <= self.distill_weight <= 1, where, prefix, "distill_weight", "a number in [0, 1]")


@dataclass(frozen=True)
class TeacherParams(_Section):
    kind: str = "trained"  # trained: train.model on the whole training set | probe: the features' linear probe | checkpoint
    checkpoint: str | None = None  # kind checkpoint: a model.pt written by the train (or teacher) stage
    steps: int = 1400  # kind trained: optimizer steps (the recipe is train's)
    seed: int = 0  # kind trained: one teacher for every run seed, as one MAE reconstructs for every run

    def check(self, where, prefix):
        self._need(self.kind in TEACHER_KINDS, where, prefix, "kind", f"one of {', '.join(TEACHER_KINDS)}")
        self._need(self.steps >= 1, where, prefix, "steps", "a positive integer")
        if self.kind == "checkpoint":
            self._need(bool(self.checkpoint), where, prefix, "checkpoint", "the path of a model.pt (kind checkpoint)")


@dataclass(frozen=True)
class LabelsParams(_Section):
    soft: bool = True  # store the teacher's soft labels in the compact store (format version 3); false: hard labels only
    k: int = 10  # the k most probable classes per image; k >= the number of classes stores them all, without ids
    bits: int = 8  # 8: uint8 in steps of 1/255 | 16: float16
    temperature: float = 4.0  # the stored probabilities are softmax(teacher logits / temperature)
    views: int = 1  # 1: the image | 2: the image and its mirror, each its own labels (train picks per flip)

    def check(self, where, prefix):
        self._need(self.k >= 1, where, prefix, "k", "a positive integer")
        self._need(self.bits in SOFT_BITS, where, prefix, "bits", f"one of {', '.join(map(str, SOFT_BITS))}")
        self._need(math.isfinite(self.temperature) and self.temperature > 0, where, prefix, "temperature",
                   "a finite number > 0")
        self._need(self.views in (1, 2), where, prefix, "views", "1 or 2")


@dataclass(frozen=True)
class ExportParams(_Section):
    format: str = "imagefolder"  # imagefolder | webdataset (dq.export.writer)
    test: str = "copy"  # copy: export the prepared test split too; skip: the train split only
    shard_images: int = 10000  # webdataset: images per tar shard

    def check(self, where, prefix):
        self._need(self.format in EXPORT_FORMATS, where, prefix, "format", f"one of {', '.join(EXPORT_FORMATS)}")
        self._need(self.test in EXPORT_TESTS, where, prefix, "test", f"one of {', '.join(EXPORT_TESTS)}")
        self._need(self.shard_images >= 1, where, prefix, "shard_images", "a positive integer")


@dataclass(frozen=True)
class RuntimeParams(_Section):
    device: str = "auto"  # auto: CUDA when present, else CPU
    nproc: int = 1  # processes per machine for features, compress and train (torchrun when > 1)
    num_workers: int = 0  # DataLoader workers
    threads: int = 0  # CPU threads for torch; 0: torch's default

    def check(self, where, prefix):
        self._need(self.device in DEVICES, where, prefix, "device", f"one of {', '.join(DEVICES)}")
        self._need(self.nproc >= 1, where, prefix, "nproc", "a positive integer")
        self._need(self.num_workers >= 0, where, prefix, "num_workers", "an integer >= 0")
        self._need(self.threads >= 0, where, prefix, "threads", "an integer >= 0")


@dataclass(frozen=True)
class Params:
    ratio: float = 0.1  # share of training samples kept
    seed: int = 0
    data: DataParams = field(default_factory=DataParams)
    features: FeaturesParams = field(default_factory=FeaturesParams)
    scores: ScoresParams = field(default_factory=ScoresParams)
    select: SelectParams = field(default_factory=SelectParams)
    patches: PatchesParams = field(default_factory=PatchesParams)
    mae: MaeParams = field(default_factory=MaeParams)
    train: TrainParams = field(default_factory=TrainParams)
    teacher: TeacherParams = field(default_factory=TeacherParams)
    labels: LabelsParams = field(default_factory=LabelsParams)
    export: ExportParams = field(default_factory=ExportParams)
    runtime: RuntimeParams = field(default_factory=RuntimeParams)

    def check(self, where: str) -> None:
        if ratio_problem(self.ratio):
            _fail(where, "ratio", self.ratio, ratio_problem(self.ratio))
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if isinstance(section, _Section):
                section.check(where, f"{f.name}.")
        self._check_patch_grid(where)
        if self.scores.dynamics == "teacher" and self.teacher.kind != "trained":
            _fail(where, "scores.dynamics", "teacher", f"runs while teacher.kind is {self.teacher.kind!r} (only a "
                  "trained teacher records training dynamics)")

    def check_model_names(self, where: str) -> None:
        """The model names that timm resolves (features.backbone; scores.model and train.model unless a
        registered classifier), checked against timm's registry without building anything. Kept out of
        `check` because timm loads torch: the stages that build a model call it first, and loading params
        stays light for the others."""
        import timm

        from dq.train.classifier import CLASSIFIERS

        if not timm.is_model(self.features.backbone):
            _fail(where, "features.backbone", self.features.backbone, "a timm model name (see timm.list_models())")
        for key, name in (("scores.model", self.scores.model), ("train.model", self.train.model)):
            if name not in CLASSIFIERS and not timm.is_model(name):
                _fail(where, key, name, f"{', '.join(CLASSIFIERS)} or a timm model name (see timm.list_models())")

    def _check_patch_grid(self, where: str) -> None:
        """The patch grid's rules (dq.patches.grid) against the prepared image side, which is data.image_size."""
        size, p = self.data.image_size, self.patches
        try:
            rows, cols = grid_of(size, p.patch_size)
        except DQError:
            _fail(where, "patches.patch_size", p.patch_size, f"a divisor of data.image_size ({size})")
        if drop_problem(p.drop, rows * cols):
            _fail(where, "patches.drop", p.drop, drop_problem(p.drop, rows * cols))

    def provenance(self, *keys: str) -> dict:
        """The params named by `keys` ("ratio", a section "select", a dotted key "data.source") as nested plain
        data: what an output file records of the params that made it. Each stage names its keys once
        (`RECORDED_PARAMS`), and tests/test_dvc_yaml.py checks them against the stage's params in dvc.yaml."""
        out: dict = {}
        for key in keys:
            head, _, rest = key.partition(".")
            if rest:
                out.setdefault(head, {})[rest] = getattr(self, head).as_plain()[rest]
            else:
                out[head] = _as_plain(getattr(self, head))
        return out


def _as_plain(value):
    return value.as_plain() if isinstance(value, _Section) else value


def _type_ok(value: Any, annotation: Any) -> bool:
    """Is `value` (as parsed by YAML) acceptable for a field annotated `annotation`?"""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    return False


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
               type(None): "null"}


def _type_words(annotation: Any) -> str:
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return " or ".join(_type_words(a) for a in typing.get_args(annotation))
    return _TYPE_WORDS.get(annotation, str(annotation))


_FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _yaml11_float(value: Any, hint: Any) -> Any:
    """`dvc exp run -S lr=1e-4` writes YAML 1.2, which PyYAML reads back as the string '1e-4'."""
    wants_float = hint is float or float in typing.get_args(hint)
    if wants_float and isinstance(value, str) and _FLOAT_RE.match(value.strip()):
        return float(value)
    return value


def _build(cls: type, raw: Any, where: str, prefix: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamError(f"{where}: {prefix.rstrip('.') or 'the file'} must be a mapping of keys, "
                         f"got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ParamError(f"{where}: unknown key {prefix}{unknown[0]}; allowed keys"
                         f"{' in ' + prefix.rstrip('.') if prefix else ''}: {', '.join(fields)}")
    values = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = hint.from_section(value, where, f"{prefix}{name}.")
            continue
        value = _yaml11_float(value, hint)
        if not _type_ok(value, hint):
            _fail(where, f"{prefix}{name}", value, _type_words(hint))
        values[name] = float(value) if hint is float else value
    return cls(**values)


def deep_merge(base: dict, overrides: dict) -> dict:
    """`base` with `overrides` applied key by key into nested sections, as `dvc exp run -S a.b=v` does."""
    out = dict(base)
    for key, value in overrides.items():
        out[key] = deep_merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def params_from_dict(raw: Any, where: str = "params") -> Params:
    """Build and validate Params from a mapping (as read from YAML)."""
    params = _build(Params, raw, where, "")
    params.check(where)
    return params


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; any problem is a ParamError naming the file and key."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ParamError(f"{path}: cannot read the params file ({exc.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark else ""
        raise ParamError(f"{path}: not valid YAML{line}") from None
    return params_from_dict(raw, str(path))
