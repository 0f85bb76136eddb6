"""The MAE: reference names and shapes, strict loading, masking, training, mask mapping, reconstruction,
the stage."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dq.core.errors import DQError
from dq.mae import model as mae
from dq.mae import reconstruct
from dq.mae import training as mae_training
from dq.mae.archs import MAE_ARCHS, MaeConfig
from dq.params import MaeParams, params_from_dict
from dq.patches.grid import pixel_keep
from dq.data.prepared import Prepared
from dq.data.prepared_writer import write_prepared

# A copy of ../shared/fixtures/mae_state_dict_shapes.json, kept here so that no clone ever skips these tests.
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "mae_state_dict_shapes.json"
REFERENCE = ("mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14")


def _fixture() -> dict:
    return json.loads(FIXTURE.read_text())["models"]


def _images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """Smooth, structured uint8 [n, size, size, 3] images: blurred blobs, so neighbours predict pixels."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    base = gaussian_filter(rng.random((n, size, size)), sigma=(0, 2.5, 2.5))
    base = (base - base.min(axis=(1, 2), keepdims=True)) / np.ptp(base, axis=(1, 2), keepdims=True)
    return np.repeat((base * 255).round().astype(np.uint8)[..., None], 3, axis=3)


# ---------------------------------------------------------------------------------------------- names
@pytest.mark.parametrize("name", REFERENCE)
def test_reference_names_and_shapes_match_fixture(name):
    expected = _fixture()[name]
    with torch.device("meta"):
        model = mae.create_mae(name)
    got = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert list(got) == list(expected)
    assert got == expected
    # fixed embeddings are parameters that do not train, as in the reference
    assert isinstance(model.pos_embed, torch.nn.Parameter) and not model.pos_embed.requires_grad
    assert not model.decoder_pos_embed.requires_grad
    assert not any(".ls1" in k or ".ls2" in k or "gamma" in k for k in got)


def test_large_saves_in_reference_layout_and_loads_back_strictly(tmp_path):
    expected = _fixture()["mae_vit_large_patch16"]
    with torch.device("meta"):
        model = mae.create_mae("mae_vit_large_patch16")
    model = model.to_empty(device="cpu")  # skip the slow init of 330M weights; fill them cheaply
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.02, 0.02, generator=gen)
    assert sum(p.numel() for p in model.parameters()) > 300_000_000
    path = tmp_path / "mae_large.pth"
    torch.save({"model": model.state_dict()}, path)

    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["model"]
    assert {k: list(v.shape) for k, v in state.items()} == expected
    with torch.device("meta"):
        again = mae.create_mae("mae_vit_large_patch16")
    mae.load_state_strict(again, state, str(path), "mae_vit_large_patch16", assign=True)
    for name in ("pos_embed", "blocks.23.mlp.fc2.weight", "decoder_pred.bias"):
        assert torch.equal(again.state_dict()[name], model.state_dict()[name])
    del model, again, state


def test_wrong_architecture_is_one_line_listing_names(tmp_path):
    small = mae.create_mae("mae_vit_micro_patch4", depth=2)
    path = tmp_path / "ckpt.pth"
    torch.save({"model": small.state_dict()}, path)
    with pytest.raises(DQError) as err:
        mae.load_mae(path, "mae_vit_micro_patch4")
    msg = str(err.value)
    assert "\n" not in msg and "unexpected: blocks.1." in msg and "mae_vit_micro_patch4" in msg

    wide = mae.create_mae("mae_vit_micro_patch4", embed_dim=64)
    torch.save({"model": wide.state_dict()}, path)
    with pytest.raises(DQError) as err:
        mae.load_mae(path, "mae_vit_micro_patch4")
    assert "\n" not in str(err.value) and "shape: cls_token [1, 1, 64] vs [1, 1, 32]" in str(err.value)

    torch.save({"weights": {}}, path)
    with pytest.raises(DQError, match="key 'model'"):
        mae.read_checkpoint(path)


def toy_mae() -> MaeConfig:
    """A 2x2 grid of 16-px patches on 32-px images, registered from this file alone."""
    return MaeConfig(img_size=32, patch_size=16, embed_dim=16, depth=1, num_heads=2, decoder_embed_dim=8,
                     decoder_depth=1, decoder_num_heads=2, mlp_ratio=2.0)


@pytest.fixture()
def toy_arch():
    MAE_ARCHS.register("toy_mae_patch16")(toy_mae)
    yield "toy_mae_patch16"
    MAE_ARCHS.unregister("toy_mae_patch16")


def test_an_architecture_registered_here_is_checked_at_load_and_runs_the_stage(toy_arch, tmp_path):
    from stages import mae as stage

    assert params_from_dict({"mae": {"arch": toy_arch}}).mae.arch == toy_arch
    with pytest.raises(DQError, match=r"^params: mae.arch = 'toy_mae_patch8' is not allowed; expected one of "
                                      r"mae_vit_base_patch16, .*, mae_vit_micro_patch4, toy_mae_patch16$"):
        params_from_dict({"mae": {"arch": "toy_mae_patch8"}})
    data = tmp_path / "data"
    _prepared(data)
    stage.main(["--params", str(_params(tmp_path, arch=toy_arch, epochs=1)), "--data", str(data)])
    model = mae.load_mae(data / "mae" / "model.pt")
    assert model.config == toy_mae() and model.patch_embed.num_patches == 4


# ---------------------------------------------------------------------------------------------- model
def test_patchify_unpatchify_round_trip_and_layout():
    model = mae.create_mae("mae_vit_micro_patch4")
    x = torch.randn(2, 3, 32, 32)
    patches = model.patchify(x)
    assert patches.shape == (2, 64, 4 * 4 * 3)
    # patch 1 is the second 4x4 block of the first row, channels last
    assert torch.equal(patches[0, 1].view(4, 4, 3), x[0, :, 0:4, 4:8].permute(1, 2, 0))
    assert torch.equal(model.unpatchify(patches), x)


def test_random_keep_counts_and_seeding():
    keep = mae.random_keep(5, 64, 0.75, torch.Generator().manual_seed(1))
    assert keep.dtype == torch.bool and keep.shape == (5, 64)
    assert (keep.sum(dim=1) == 16).all()
    assert torch.equal(keep, mae.random_keep(5, 64, 0.75, torch.Generator().manual_seed(1)))
    with pytest.raises(ValueError, match="same number"):
        mae.MaskedAutoencoderViT.keep_order(torch.tensor([[True, False], [True, True]]))


def test_encoder_never_sees_dropped_tokens():
    torch.manual_seed(0)
    model = mae.create_mae("mae_vit_micro_patch4").eval()
    x = torch.randn(3, 3, 32, 32)
    keep = mae.random_keep(3, 64, 0.5, torch.Generator().manual_seed(0))
    dropped_px = torch.from_numpy(pixel_keep(~keep.numpy(), 4, 32))[:, None].expand(-1, 3, -1, -1)
    changed = torch.where(dropped_px, torch.randn_like(x) * 100, x)
    with torch.no_grad():
        latent, ids_restore = model.forward_encoder(x, keep)
        latent2, ids_restore2 = model.forward_encoder(changed, keep)
        other = model.forward_encoder(torch.where(dropped_px, x, x + 1), keep)[0]
    assert latent.shape == (3, 1 + 32, 32)
    assert torch.equal(latent, latent2) and torch.equal(ids_restore, ids_restore2)
    assert not torch.allclose(latent, other)  # ...while kept pixels do matter


def test_short_training_lowers_the_loss():
    torch.manual_seed(0)
    images = torch.from_numpy(_images(32))
    model = mae.create_mae("mae_vit_micro_patch4")
    keep = mae.random_keep(32, 64, 0.75, torch.Generator().manual_seed(123))

    def held_loss():
        with torch.no_grad():
            return float(model.eval()(mae.to_model_input(images, model.config), keep)[0])

    before = held_loss()
    state = mae_training.TrainState(model, mae_training.adamw_optimizer(model, 3.0e-3, 0.05))
    recipe = MaeParams(mask_ratio=0.75, batch_size=16, lr=3.0e-3, warmup_epochs=1, epochs=8)
    for _ in range(8):
        list(mae_training.train_mae_epoch(state, images, recipe, seed=0, device=torch.device("cpu")))
    assert state.epoch == 8
    assert held_loss() < 0.7 * before


def test_training_streamed_from_the_store_equals_training_in_memory(tmp_path, monkeypatch):
    """The mae stage reads the prepared store batch by batch (DataLoader workers included): the same
    pixels in the same order as a tensor in memory, so the same weights; no read is larger than a batch."""
    from dq.data.prepared import Store, open_store

    images = _images(40)
    write_prepared(tmp_path / "train", Prepared(images, np.arange(40) % 2, ["a", "b"], "synthetic"),
                   shard_images=16)
    largest = []
    streams = Store.streams
    monkeypatch.setattr(Store, "streams", lambda self, rows: (largest.append(len(rows)), streams(self, rows))[1])

    def trained(source, workers):
        torch.manual_seed(0)
        model = mae.create_mae("mae_vit_micro_patch4")
        state = mae_training.TrainState(model, mae_training.adamw_optimizer(model, 3.0e-3, 0.05))
        recipe = MaeParams(mask_ratio=0.75, batch_size=16, lr=3.0e-3, warmup_epochs=1, epochs=2)
        losses = [list(mae_training.train_mae_epoch(state, source, recipe, seed=0, device=torch.device("cpu"),
                                                    num_workers=workers)) for _ in range(2)]
        return losses, model.state_dict()

    reference = trained(torch.from_numpy(images), 0)
    for workers in (0, 2):
        losses, weights = trained(open_store(tmp_path / "train"), workers)
        assert losses == reference[0]
        assert all(torch.equal(weights[k], reference[1][k]) for k in weights)
    assert largest and max(largest) == 16


def test_lr_schedule_warms_up_then_decays():
    lrs = [mae_training.lr_at(s, lr=1.0, warmup=2, total=10) for s in (0, 1, 2, 6, 10)]
    assert lrs[0] == 0 and lrs[1] == pytest.approx(0.5) and lrs[2] == pytest.approx(1.0)
    assert lrs[3] == pytest.approx(0.5) and lrs[4] == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------------------------------------- masks
def test_map_keep_16px_mae_on_224_vs_4px_stored_on_32():
    def mae_dropped(stored_dropped):
        keep = np.ones((1, 64), dtype=bool)
        for r, c in stored_dropped:
            keep[0, r * 8 + c] = False
        kept = reconstruct.map_keep(keep, 32, 4, 224, 16)
        assert kept.shape == (1, 196)
        return {divmod(int(i), 14) for i in np.flatnonzero(~kept[0])}

    assert mae_dropped([]) == set()
    # worked by hand: MAE row i reads stored pixel rows floor/ceil((16 i + 0.5) / 7 - 0.5) .. of its last pixel
    assert mae_dropped([(0, 0)]) == {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert mae_dropped([(7, 7)]) == {(12, 12), (12, 13), (13, 12), (13, 13)}
    assert mae_dropped([(2, 5)]) == {(r, c) for r in (3, 4, 5) for c in (8, 9, 10)}
    assert mae_dropped([(0, 0), (7, 7)]) == mae_dropped([(0, 0)]) | mae_dropped([(7, 7)])


def test_map_keep_is_identity_on_equal_grids_and_never_reads_dropped_pixels():
    rng = np.random.default_rng(0)
    keep = rng.random((4, 64)) < 0.7
    assert np.array_equal(reconstruct.map_keep(keep, 32, 4, 32, 4), keep)
    # whatever the dropped pixels hold, the resized pixels of a kept MAE patch are the same
    for size, patch in ((224, 16), (56, 8), (64, 8), (24, 4)):
        kept_m = reconstruct.map_keep(keep, 32, 4, size, patch)
        dropped_px = ~pixel_keep(keep, 4, 32)
        a = torch.from_numpy(np.where(dropped_px, rng.random((4, 32, 32)), 0.5))[:, None]
        b = torch.from_numpy(np.where(dropped_px, rng.random((4, 32, 32)) * 1e6, 0.5))[:, None]
        model = mae.create_mae("mae_vit_micro_patch4", img_size=size, patch_size=patch)
        pa, pb = (model.patchify(mae.resize(v, size).expand(-1, 3, -1, -1)) for v in (a, b))
        same = (pa == pb).all(dim=-1).numpy()
        assert same[kept_m].all(), (size, patch)
        assert (~kept_m).any()


# ---------------------------------------------------------------------------------------------- reconstruct
@pytest.mark.parametrize("size,patch,norm_pix", [(32, 4, False), (32, 4, True), (56, 8, False), (224, 16, True)])
def test_reconstruct_keeps_kept_pixels_exactly(size, patch, norm_pix):
    torch.manual_seed(0)
    model = mae.create_mae("mae_vit_micro_patch4", img_size=size, patch_size=patch, norm_pix_loss=norm_pix)
    images = _images(7)
    keep = reconstruct.eval_keep(7, 64, 0.25, seed=3)
    keep[0] = True  # a row with nothing to fill
    kept_px = pixel_keep(keep, 4, 32)
    masked = np.where(kept_px[..., None], images, 0).astype(np.uint8)
    out = reconstruct.reconstruct(model, masked, keep, 4, batch_size=3, progress=False)
    assert out.dtype == np.uint8 and out.shape == images.shape
    assert np.array_equal(out[kept_px], images[kept_px])
    assert np.array_equal(out[0], images[0])
    assert (out[~kept_px] != 0).any()  # dropped pixels were filled by the model
    # the dropped pixels' content never reaches the result, and batching does not matter
    scrambled = np.where(kept_px[..., None], images, 255 - images).astype(np.uint8)
    assert np.array_equal(reconstruct.reconstruct(model, scrambled, keep, 4, batch_size=5, progress=False), out)


def test_reconstruct_rejects_a_mask_of_the_wrong_grid():
    model = mae.create_mae("mae_vit_micro_patch4")
    with pytest.raises(ValueError, match="keep must be bool"):
        reconstruct.reconstruct(model, _images(2), np.ones((2, 16), bool), 4, progress=False)


# ---------------------------------------------------------------------------------------------- fills, metrics
def test_simple_fills():
    images = np.zeros((1, 8, 8, 3), np.uint8)
    images[0, :, :4] = 10
    images[0, :, 4:] = 200
    keep = np.array([[True, False, True, True]])  # 2x2 grid of 4 px patches: top-right dropped
    masked = np.where(pixel_keep(keep, 4, 8)[..., None], images, 0).astype(np.uint8)
    mean = reconstruct.mean_fill(masked, keep, 4)
    assert (mean[0, :4, 4:] == round((16 * 10 + 16 * 10 + 16 * 200) / 48)).all()
    near = reconstruct.nearest_fill(masked, keep, 4)
    for r in range(4):
        for c in range(4, 8):
            left, below = c - 3, 4 - r  # distances to the kept columns 0-3 (10) and rows 4-7 (200)
            if left != below:
                assert near[0, r, c, 0] == (10 if left < below else 200), (r, c)
    assert np.array_equal(near[0, 4:], images[0, 4:])


@pytest.mark.parametrize("size", [32, 8])
def test_ssim_and_psnr_count_only_the_dropped_pixels(size):
    from skimage.metrics import structural_similarity

    a, b = _images(2, size, seed=1), _images(2, size, seed=2)
    dropped = np.zeros((2, size, size), bool)
    dropped[:, :4, :4] = True
    dropped[1, -3:, 2:] = True
    expected = []
    for i in range(2):
        _, full = structural_similarity(b[i], a[i], data_range=255, channel_axis=2, gaussian_weights=True,
                                        sigma=1.5, use_sample_covariance=False, full=True,
                                        win_size=min(11, size - 1))
        expected.append(full.mean(axis=-1)[dropped[i]].mean())
    assert reconstruct.ssim_dropped(b, a, dropped) == pytest.approx(np.mean(expected), abs=1e-12)
    same = np.where(dropped[..., None], a, b)  # equal on the dropped pixels only
    assert reconstruct.ssim_dropped(same, a, dropped) > reconstruct.ssim_dropped(b, a, dropped)

    noisy = a.copy()
    noisy[:, 4:] = 0  # errors outside the dropped pixels do not count
    noisy[1, -3:, 2:] = a[1, -3:, 2:]
    assert reconstruct.psnr_dropped(noisy, a, dropped) == pytest.approx(100.0)
    noisy[:, :4, :4] = np.clip(a[:, :4, :4].astype(int) + 10, 0, 255)
    mse = [((noisy[i][dropped[i]].astype(float) - a[i][dropped[i]]) ** 2).mean() for i in range(2)]
    assert reconstruct.psnr_dropped(noisy, a, dropped) == pytest.approx(np.mean([10 * np.log10(255**2 / m) for m in mse]))


# ---------------------------------------------------------------------------------------------- stage
def _prepared(root: Path) -> None:
    for split, n, seed in (("train", 96, 0), ("test", 24, 1)):
        images = _images(n, seed=seed)
        write_prepared(root / "prepared" / split,
                       Prepared(images, np.arange(n, dtype=np.int64) % 2, ["a", "b"], "synthetic"))


def _params(tmp_path: Path, **mae_overrides) -> Path:
    raw = {"seed": 0, "patches": {"drop": 0.25, "patch_size": 4},
           "mae": {"arch": "mae_vit_micro_patch4", "epochs": 3, "batch_size": 32, "lr": 3.0e-3,
                   "warmup_epochs": 1, "eval_images": 12, "norm_pix_loss": False} | mae_overrides,
           "runtime": {"device": "cpu"}}
    path = tmp_path / f"params-{len(list(tmp_path.glob('params-*')))}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_stage_trains_evaluates_is_deterministic_and_resumes(tmp_path, monkeypatch):
    from stages import mae as stage

    data = tmp_path / "data"
    _prepared(data)
    params = _params(tmp_path)
    stage.main(["--params", str(params), "--data", str(data)])
    model_bytes = (data / "mae" / "model.pt").read_bytes()
    metrics = json.loads((data / "mae_metrics.json").read_text())
    assert set(metrics) >= {"mae", "mean_fill", "nearest_fill"}
    assert all(0 < metrics[k]["ssim"] <= 1 and np.isfinite(metrics[k]["psnr"]) for k in ("mae", "mean_fill"))
    assert (data / "mae_plots" / "reconstruction.png").stat().st_size > 1000
    loss_tsv = (data / "mae_live" / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()
    assert len(loss_tsv) == 1 + 3
    model = mae.load_mae(data / "mae" / "model.pt")
    assert model.config.img_size == 32 and model.config.depth == 1

    # the same params give the same bytes
    stage.main(["--params", str(params), "--data", str(data)])
    assert (data / "mae" / "model.pt").read_bytes() == model_bytes
    metrics_bytes = (data / "mae_metrics.json").read_bytes()

    # a run killed after epoch 2 and resumed gives the same model as a straight run
    for out in ("mae", "mae_ckpt", "mae_live"):
        __import__("shutil").rmtree(data / out)
    real_epoch = mae_training.train_mae_epoch

    def dies_in_epoch_3(state, *args, **kwargs):
        if state.epoch == 2:
            raise KeyboardInterrupt
        return real_epoch(state, *args, **kwargs)

    monkeypatch.setattr(mae_training, "train_mae_epoch", dies_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        stage.main(["--params", str(params), "--data", str(data)])
    assert not (data / "mae" / "model.pt").exists() and (data / "mae_ckpt" / "last.pt").is_file()
    monkeypatch.setattr(mae_training, "train_mae_epoch", real_epoch)
    stage.main(["--params", str(_params(tmp_path, resume=True)), "--data", str(data)])
    assert (data / "mae" / "model.pt").read_bytes() == model_bytes
    assert (data / "mae_metrics.json").read_bytes() == metrics_bytes
    assert len((data / "mae_live" / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()) == 4

    # resuming from a state saved with other params is refused
    with pytest.raises(DQError, match="other mae params"):
        stage.main(["--params", str(_params(tmp_path, resume=True, lr=1.0e-3)), "--data", str(data)])


def test_stage_loads_a_reference_checkpoint_strictly(tmp_path):
    from stages import mae as stage

    data = tmp_path / "data"
    _prepared(data)
    ref = mae.create_mae("mae_vit_micro_patch4")
    ckpt = tmp_path / "mae_visualize_micro.pth"
    torch.save({"model": ref.state_dict()}, ckpt)
    stage.main(["--params", str(_params(tmp_path, checkpoint=str(ckpt))), "--data", str(data)])
    saved = torch.load(data / "mae" / "model.pt", weights_only=True)
    assert saved["arch"] == "mae_vit_micro_patch4" and not (data / "mae_ckpt").exists()
    assert all(torch.equal(saved["model"][k], v) for k, v in ref.state_dict().items())

    wrong = mae.create_mae("mae_vit_micro_patch4", decoder_depth=2)
    torch.save({"model": wrong.state_dict()}, ckpt)
    with pytest.raises(DQError, match=r"does not fit mae.arch = 'mae_vit_micro_patch4': unexpected: decoder_blocks\.1\."):
        stage.main(["--params", str(_params(tmp_path, checkpoint=str(ckpt))), "--data", str(data)])
