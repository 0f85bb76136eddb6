"""DVC stage `mae`: train the small MAE (or load a reference checkpoint) → data/mae/model.pt.

Outputs (paths under --data, see dq.core.paths):
  mae/model.pt              {'model': state_dict (reference names), 'arch': name, 'config': {...}}
  mae_metrics.json          PSNR/SSIM of the dropped patches of held-out test images: MAE vs simple fills
  mae_plots/reconstruction.png   original | kept | reconstructed
  mae_live/                 DVCLive loss curves (per epoch)
  mae_ckpt/last.pt          training state saved after every epoch, for `mae.resume: true`. It lies
                            outside the declared outputs on purpose: DVC deletes outputs before a
                            stage runs, and this file must survive a killed run.
The evaluation masks are drawn from `seed` at `patches.drop` / `patches.patch_size`, so this stage does
not depend on selection or compression, and `dvc exp run -S ratio=...` does not retrain the MAE.
Training is dq.mae.training, the evaluation dq.mae.reconstruct.
"""
from __future__ import annotations

import sys
import time

from dq.core.errors import run_cli
from dq.mae.reconstruct import reconstruction_metrics
from dq.core.io import write_metrics
from dq.mae.model import save_mae
from dq.mae.training import MaeFiles, trained_mae
from dq.core.paths import DataPaths
from dq.core.runtime import device_for, seed_everything
from stages.common import parse_args


def main(argv: list[str] | None = None) -> None:
    args, params = parse_args("Train or load the MAE that reconstructs dropped patches; evaluate it.", argv)
    paths = DataPaths(args.data)
    seed_everything(params.seed, params.runtime)
    device = device_for(params.runtime)
    started = time.perf_counter()

    files = MaeFiles(paths.prepared_split("train"), paths.mae_resume, paths.mae_live)
    model, final_loss = trained_mae(params.mae, params.seed, files, device=device,
                                    num_workers=params.runtime.num_workers)
    save_mae(paths.mae_model, model, params.mae.arch)
    metrics = reconstruction_metrics(model, params, paths.prepared_split("test"), paths.mae_figure, device)
    metrics["train_loss"] = final_loss
    write_metrics(paths.mae_metrics, metrics)
    print(f"mae: PSNR {metrics['mae']['psnr']:.2f} dB (mean fill {metrics['mean_fill']['psnr']:.2f}, "
          f"nearest {metrics['nearest_fill']['psnr']:.2f}), SSIM {metrics['mae']['ssim']:.4f} "
          f"(mean fill {metrics['mean_fill']['ssim']:.4f}, nearest {metrics['nearest_fill']['ssim']:.4f}) "
          f"in {time.perf_counter() - started:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
