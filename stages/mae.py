"""DVC stage `mae`: train the small MAE (or load a reference checkpoint) → data/mae/model.pt.

Outputs (paths under --data):
  mae/model.pt              {'model': state_dict (reference names), 'arch': name, 'config': {...}}
  mae_metrics.json          PSNR/SSIM of the dropped patches of held-out test images: MAE vs simple fills
  mae_plots/reconstruction.png   original | kept | reconstructed
  mae_live/                 DVCLive loss curves (per epoch)
  mae_ckpt/last.pt          training state saved after every epoch, for `mae.resume: true`. It lies
                            outside the declared outputs on purpose: DVC deletes outputs before a
                            stage runs, and this file must survive a killed run.
The evaluation masks are drawn from `seed` at `patches.drop` / `patches.patch_size`, so this stage does
not depend on selection or compression, and `dvc exp run -S ratio=...` does not retrain the MAE.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dq import mae
from dq.errors import DQError, run_cli
from dq.io import atomic_path, write_json
from dq.prepared import read_prepared
from dq.params import Params
from dq.runtime import device_for, seed_everything
from stages.common import parse_args

FIGURE_IMAGES = 6
DROPPED_COLOUR = (70, 110, 180)


def main(argv: list[str] | None = None) -> None:
    args, params = parse_args("Train or load the MAE that fills dropped patches; evaluate it.", argv)
    data: Path = args.data
    p = params.mae
    seed_everything(params.seed, params.runtime)
    device = device_for(params.runtime)
    started = time.perf_counter()

    model = build_model(params)
    if p.checkpoint:
        mae.load_state_strict(model, mae.read_checkpoint(p.checkpoint)["model"], p.checkpoint, p.arch)
        final_loss = None
    else:
        final_loss = train(model, params, data, device)
    with atomic_path(data / "mae" / "model.pt") as tmp:
        tmp.parent.mkdir(parents=True, exist_ok=True)
        torch.save(mae.checkpoint_dict(model, p.arch), tmp)

    metrics = evaluate(model, params, data, device)
    metrics["train_loss"] = final_loss
    write_json(data / "mae_metrics.json", metrics)
    print(f"mae: PSNR {metrics['mae']['psnr']:.2f} dB (mean fill {metrics['mean_fill']['psnr']:.2f}, "
          f"nearest {metrics['nearest_fill']['psnr']:.2f}), SSIM {metrics['mae']['ssim']:.4f} "
          f"(mean fill {metrics['mean_fill']['ssim']:.4f}, nearest {metrics['nearest_fill']['ssim']:.4f}) "
          f"in {time.perf_counter() - started:.0f} s", file=sys.stderr)


def build_model(params: Params) -> mae.MaskedAutoencoderViT:
    p = params.mae
    config = mae.mae_config(p.arch, img_size=p.input_size, norm_pix_loss=p.norm_pix_loss)
    if p.input_size % config.patch_size:
        raise DQError(f"params.yaml: mae.input_size = {p.input_size} is not allowed; expected a multiple "
                      f"of the patch size of {p.arch} ({config.patch_size})")
    return mae.MaskedAutoencoderViT(config)


def train(model: mae.MaskedAutoencoderViT, params: Params, data: Path, device: torch.device) -> float:
    """Train on the prepared training set; save a resumable state after every epoch; log to DVCLive."""
    from dvclive import Live
    from tqdm import tqdm

    p = params.mae
    images = torch.from_numpy(read_prepared(data / "prepared" / "train.h5").images)
    model.to(device)
    optimizer = mae.make_optimizer(model, p.lr, p.weight_decay)
    state = mae.TrainState(model, optimizer)
    history: list[dict] = []
    resume_path = data / "mae_ckpt" / "last.pt"
    fingerprint = {"seed": params.seed, "mae": params.section_dict("mae")["mae"] | {"resume": None,
                                                                                    "eval_images": None},
                   "images": list(images.shape)}
    if p.resume and resume_path.is_file():
        history = load_resume(resume_path, state, fingerprint)
        print(f"mae: resuming after epoch {state.epoch} from {resume_path}", file=sys.stderr)

    steps = math.ceil(images.shape[0] / p.batch_size)
    with Live(dir=str(data / "mae_live"), save_dvc_exp=False, dvcyaml=None) as live, \
            tqdm(total=p.epochs * steps, initial=state.epoch * steps, desc="mae train", unit="step") as bar:
        for record in history:
            log_epoch(live, record)
        while state.epoch < p.epochs:
            epoch = state.epoch
            losses = list(mae.train_epoch(state, images, seed=params.seed, mask_ratio=p.mask_ratio,
                                          batch_size=p.batch_size, lr=p.lr, warmup_epochs=p.warmup_epochs,
                                          epochs=p.epochs, device=device, progress=bar))
            record = {"epoch": epoch, "loss": float(np.mean(losses)), "lr": optimizer.param_groups[0]["lr"]}
            if not math.isfinite(record["loss"]):
                raise DQError(f"params.yaml: mae.lr = {p.lr} made the MAE loss diverge (epoch {epoch}); "
                              "expected a smaller learning rate")
            history.append(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            log_epoch(live, record)
            save_resume(resume_path, state, fingerprint, history)
    model.eval()
    return history[-1]["loss"] if history else float("nan")


def log_epoch(live, record: dict) -> None:
    live.step = record["epoch"]
    live.log_metric("train/loss", record["loss"])
    live.log_metric("train/lr", record["lr"])
    live.next_step()


def save_resume(path: Path, state: mae.TrainState, fingerprint: dict, history: list[dict]) -> None:
    with atomic_path(path) as tmp:
        torch.save({"model": state.model.state_dict(), "optimizer": state.optimizer.state_dict(),
                    "epoch": state.epoch, "fingerprint": fingerprint, "history": history}, tmp)


def load_resume(path: Path, state: mae.TrainState, fingerprint: dict) -> list[dict]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        raise DQError(f"{path}: not a readable MAE training state; delete it or set mae.resume: false") from None
    if ckpt.get("fingerprint") != fingerprint:
        raise DQError(f"{path}: was saved with other mae params, seed or training data; delete it or set "
                      "mae.resume: false")
    state.model.load_state_dict(ckpt["model"])
    state.optimizer.load_state_dict(ckpt["optimizer"])
    state.epoch = int(ckpt["epoch"])
    return list(ckpt["history"])


def evaluate(model: mae.MaskedAutoencoderViT, params: Params, data: Path, device: torch.device) -> dict:
    """PSNR/SSIM on the dropped patches of the first mae.eval_images test images: MAE vs simple fills."""
    test = read_prepared(data / "prepared" / "test.h5")
    originals = test.images[: params.mae.eval_images]
    size, patch = originals.shape[1], params.patches.patch_size
    if size % patch:
        raise DQError(f"params.yaml: patches.patch_size = {patch} is not allowed; expected a divisor of the "
                      f"prepared image size ({size})")
    keep = mae.eval_keep(len(originals), (size // patch) ** 2, params.patches.drop, params.seed)
    kept_px = mae.pixel_keep(keep, patch, size)
    masked = np.where(kept_px[..., None], originals, 0).astype(np.uint8)
    fills = {
        "mae": mae.reconstruct(model, masked, keep, patch, batch_size=params.mae.batch_size, device=device),
        "mean_fill": mae.mean_fill(masked, keep, patch),
        "nearest_fill": mae.nearest_fill(masked, keep, patch),
    }
    dropped = ~kept_px
    metrics = {name: {"psnr": round(mae.psnr_dropped(img, originals, dropped), 4),
                      "ssim": round(mae.ssim_dropped(img, originals, dropped), 5)}
               for name, img in fills.items()}
    metrics.update(eval_images=len(originals), drop=params.patches.drop, patch_size=patch, arch=params.mae.arch)
    # dropped patches shown in a colour no prepared image has, so black backgrounds do not hide them
    shown = np.where(kept_px[..., None], originals, np.array(DROPPED_COLOUR, np.uint8)).astype(np.uint8)
    mae.save_reconstruction_figure(data / "mae_plots" / "reconstruction.png", originals[:FIGURE_IMAGES],
                                   shown[:FIGURE_IMAGES], fills["mae"][:FIGURE_IMAGES])
    return metrics


if __name__ == "__main__":
    run_cli(main)
