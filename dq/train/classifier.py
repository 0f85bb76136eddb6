"""The classifier the train stage trains, and its file `train/model.pt` (this module owns the artifact).

`train.model` names a classifier of dq's own registry `CLASSIFIERS` (`smallnet`, dq/train/smallnet.py: the
fast default for images of at most 64 px) or any timm model. A registered classifier is a factory
`(num_classes, image_size) -> nn.Module`; one that defines `init_from_data(images)` is handed a sample of
normalised training images before its first step (smallnet sets its frozen whitening layer from them).

Small images. timm's ResNets begin with a stride-2 stem and a max-pool, which leave a 32×32 image 8×8
before the first stage. For a ResNet (any `timm.models.resnet.ResNet`) on images of at most 64 pixels,
`create_classifier` swaps in the CIFAR stem: one 3×3 convolution with stride 1 and no max-pool. Other
architectures are built as timm defines them. `save_classifier` writes the weights with what is needed
to rebuild and normalise them (byte-identical reruns); `read_classifier` rebuilds and validates.

Neither torch nor timm is imported until a model is built or read, so `dq.params` reads `CLASSIFIERS` cheaply.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dq.core.errors import DQError, first_line
from dq.core.registry import Registry

if TYPE_CHECKING:
    import torch.nn as nn

    from dq.params import TrainParams

CIFAR_STEM_MAX_SIZE = 64

CLASSIFIERS = Registry("classifier", "train.model", max_image_size=None)


@CLASSIFIERS.register("smallnet", max_image_size=64)
def _smallnet(num_classes: int, image_size: int):
    from dq.train.smallnet import create_smallnet

    return create_smallnet(num_classes)


def create_classifier(name: str, num_classes: int, image_size: int):
    """A randomly initialised classifier: a registered one (`CLASSIFIERS`), else timm's; ResNets on images
    <= 64 px get the CIFAR stem."""
    if name in CLASSIFIERS:
        entry = CLASSIFIERS.get(name)
        if entry.max_image_size is not None and image_size > entry.max_image_size:
            raise DQError(f"train.model = {name!r} is built for images of at most {entry.max_image_size} px, "
                          f"got {image_size} px; use a timm model such as resnet18")
        return entry.obj(num_classes, image_size)
    import timm

    try:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    except (RuntimeError, ValueError) as exc:
        raise DQError(f"train.model = {name!r}: timm cannot build it ({first_line(exc, 160)})") from None
    if uses_cifar_stem(model, image_size):
        replace_stem_with_cifar(model)
    return model


def uses_cifar_stem(model, image_size: int) -> bool:
    from timm.models.resnet import ResNet

    return isinstance(model, ResNet) and image_size <= CIFAR_STEM_MAX_SIZE


def replace_stem_with_cifar(model) -> None:
    """conv1 → 3×3 stride-1 conv into the stem's output width; max-pool → identity."""
    import torch.nn as nn

    in_chans = _first_conv(model.conv1).in_channels
    conv = nn.Conv2d(in_chans, model.bn1.num_features, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")  # as timm inits convs
    model.conv1 = conv
    model.maxpool = nn.Identity()


def _first_conv(module):
    import torch.nn as nn

    if isinstance(module, nn.Conv2d):
        return module
    return next(m for m in module.modules() if isinstance(m, nn.Conv2d))


def save_classifier(path: str | Path, result, config: TrainParams, classes: list[str],
                    image_size: int) -> None:
    """model.pt: the state dict plus what is needed to rebuild and normalise (byte-identical reruns)."""
    from dq.core.checkpoint import save_atomic

    state = {"model": result.model.state_dict(), "arch": config.model, "num_classes": len(classes),
             "classes": list(classes), "image_size": int(image_size), "mean": result.mean, "std": result.std,
             "cifar_stem": bool(result.meta.get("cifar_stem", False))}
    save_atomic(path, state)


@dataclass
class Classifier:
    """A trained classifier read back from its model.pt: the model (eval mode) and how to feed it."""

    model: nn.Module
    classes: list[str]
    image_size: int
    mean: list[float]
    std: list[float]


CLASSIFIER_KEYS = ("model", "arch", "num_classes", "classes", "image_size", "mean", "std", "cifar_stem")


def read_classifier(path: str | Path) -> Classifier:
    """Read and validate a classifier written by `save_classifier`, rebuilt in eval mode on the CPU."""
    from dq.core.checkpoint import read_torch

    path = Path(path)
    state = read_torch(path, "classifier file", fix="; run the train stage")
    missing = [k for k in CLASSIFIER_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise DQError(f"{path}: missing '{missing[0]}'; is this a model.pt written by the train stage?")
    model = create_classifier(state["arch"], int(state["num_classes"]), int(state["image_size"]))
    if uses_cifar_stem(model, int(state["image_size"])) != bool(state["cifar_stem"]):
        raise DQError(f"{path}: its stem does not match {state['arch']} at {state['image_size']} px; "
                      "rerun the train stage")
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise DQError(f"{path}: weights do not fit {state['arch']} ({first_line(exc, 160)})") from None
    return Classifier(model.eval(), list(state["classes"]), int(state["image_size"]), list(state["mean"]),
                      list(state["std"]))
