"""The train stage under torchrun: two gloo processes on the CPU learn, rank 0 alone writes, and
`python -m stages.launch train` with runtime.nproc: 2 starts the same run."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from dq.core import distributed
from dq.mae.rebuilt import RebuildOptions
from dq.train.data import compact_training_set, full_training_set
from dq.train.loop import TrainHooks, _batch_loss, train_classifier
from dq.train.schedule import steps_per_epoch
from dq.data.prepared_writer import write_prepared
from dq.params import TrainParams
from tests.test_train import TINY, blobs, make_pipeline_inputs, write_params

REPO = Path(__file__).resolve().parents[1]
OUTPUTS = ("train/model.pt", "train/evaluation.json", "train_metrics.json", "train_live/plots/metrics/test/acc.tsv")

# Run as a script by torchrun: records every file this rank opens for writing, creates, renames or
# removes under --data (Python's audit events), then runs the train stage in this process.
AUDIT = textwrap.dedent('''
    import os, runpy, sys
    data = os.path.realpath(sys.argv[sys.argv.index("--data") + 1])
    log = open(os.path.join(os.environ["AUDIT_DIR"], "rank" + os.environ["RANK"] + ".txt"), "w")
    WRITES = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            if not ((isinstance(mode, str) and any(c in mode for c in "wax+")) or (flags or 0) & WRITES):
                return
        elif event not in ("os.rename", "os.replace", "os.remove", "os.mkdir", "os.rmdir"):
            return
        else:
            path = args[1] if event in ("os.rename", "os.replace") else args[0]  # a rename: its target
        if isinstance(path, (str, bytes, os.PathLike)) and os.path.realpath(os.fsdecode(path)).startswith(data):
            log.write(event + " " + os.fsdecode(path) + "\\n")
            log.flush()

    sys.addaudithook(hook)
    sys.argv = ["stages.train"] + sys.argv[1:]
    runpy.run_module("stages.train", run_name="__main__", alter_sys=True)
''')


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _setup(root: Path, **runtime) -> Path:
    """prepared/ with 96 training and 40 test images of 4 classes; params for the `full` input."""
    train_set, test = blobs(96, seed=1), blobs(40, seed=2)
    write_prepared(root / "data" / "prepared" / "train", train_set)
    write_prepared(root / "data" / "prepared" / "test", test)
    params = write_params(root / "params.yaml", input="full")
    raw = yaml.safe_load(params.read_text())
    raw["runtime"].update(runtime)
    params.write_text(yaml.safe_dump(raw))
    return params


def _env(**extra) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), **extra)


def _run(cmd: list[str], env: dict) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """The stage run by torchrun with 2 processes, each under the write audit."""
    root = tmp_path_factory.mktemp("ddp")
    params = _setup(root)
    (root / "audit.py").write_text(AUDIT)
    (root / "audit").mkdir()
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
          str(root / "audit.py"), "--params", str(params), "--data", str(root / "data")],
         _env(AUDIT_DIR=str(root / "audit")))
    return root


def test_two_ranks_learn_and_report_sane_metrics(two_ranks):
    metrics = json.loads((two_ranks / "data" / "train_metrics.json").read_text())
    assert metrics["top1"] > 0.6  # chance is 0.25; one process reaches > 0.7 (test_train)
    assert metrics["train_images"] == 96 and metrics["epochs"] == TINY.epochs
    evaluation = json.loads((two_ranks / "data" / "train" / "evaluation.json").read_text())
    assert np.array(evaluation["confusion"]).sum() == 40  # every test image scored once, over both shards
    assert [r["epoch"] for r in evaluation["history"]] == list(range(1, TINY.epochs + 1))
    state = torch.load(two_ranks / "data" / "train" / "model.pt", weights_only=False)
    assert not any(k.startswith("module.") for k in state["model"])  # the plain model, not the DDP wrapper


def test_only_rank_0_writes(two_ranks):
    rank0 = (two_ranks / "audit" / "rank0.txt").read_text()
    rank1 = (two_ranks / "audit" / "rank1.txt").read_text()
    assert rank1 == ""
    data = two_ranks / "data"
    for name in ("train/model.pt", "train/evaluation.json", "train_metrics.json", "train_ckpt/last.pt"):
        assert f"os.rename {data / name}" in rank0, name  # atomic writes: temp file, then os.replace
    assert f"open {data / 'train_live'}" in rank0  # DVCLive's plots
    assert not list((two_ranks / "data").rglob(".*tmp*"))


# Run by torchrun: reconstructs the compact set in batches of 8 and logs each rank's batch sizes, then runs the stage.
RECONSTRUCT_LOG = textwrap.dedent('''
    import os, runpy, sys
    from dq.mae import rebuilt, reconstruct
    rebuilt.RECONSTRUCT_BATCH_SIZE = 8
    log = open(os.path.join(os.environ["AUDIT_DIR"], "batches" + os.environ["RANK"] + ".txt"), "w")
    real = reconstruct.reconstruct_batch

    def logged(model, images, *args, **kwargs):
        log.write(f"{len(images)}\\n")
        log.flush()
        return real(model, images, *args, **kwargs)

    reconstruct.reconstruct_batch = logged
    sys.argv = ["stages.train"] + sys.argv[1:]
    runpy.run_module("stages.train", run_name="__main__", alter_sys=True)
''')


def test_two_ranks_rebuild_the_compact_set_once_between_them(tmp_path):
    """Each rank reconstructs a disjoint share of the batches into one cache, the single process's bytes."""
    data = tmp_path / "data"
    keep = make_pipeline_inputs(data, (blobs(96, seed=1), blobs(40, seed=2)))
    params = write_params(tmp_path / "params.yaml", input="compact", epochs=1)
    (tmp_path / "reconstruct_log.py").write_text(RECONSTRUCT_LOG)
    (tmp_path / "audit").mkdir()
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
          str(tmp_path / "reconstruct_log.py"), "--params", str(params), "--data", str(data)],
         _env(AUDIT_DIR=str(tmp_path / "audit")))
    shares = [[int(v) for v in (tmp_path / "audit" / f"batches{r}.txt").read_text().split()] for r in (0, 1)]
    assert all(shares) and sum(map(sum, shares)) == len(keep), shares  # once in all, both ranks working
    single = compact_training_set(data / "compact" / "dataset.h5", data / "mae" / "model.pt",
                                  rebuilt_cache=tmp_path / "single", options=RebuildOptions(batch_size=8))
    assert np.array_equal(np.load(data / "fill" / "images.npy"), single.images.read(np.arange(len(keep))))
    assert json.loads((data / "train_metrics.json").read_text())["train_images"] == len(keep)
    assert not list(data.rglob(".*tmp*"))


def test_launch_with_nproc_2_runs_torchrun_and_repeats_the_run(two_ranks, tmp_path):
    """runtime.nproc: 2 through the DVC command gives the bytes of the direct torchrun run (gloo on the
    CPU is deterministic for a fixed number of processes)."""
    params = _setup(tmp_path, nproc=2)
    done = _run([sys.executable, "-m", "stages.launch", "train", "--params", str(params),
                 "--data", str(tmp_path / "data")], _env())
    assert "2 process(es)" in done.stderr
    for name in OUTPUTS:
        assert _sha256(tmp_path / "data" / name) == _sha256(two_ranks / "data" / name), name


def test_two_ranks_take_a_step_budget_in_the_rounds_of_one_process(tmp_path):
    params = _setup(tmp_path, nproc=2)
    raw = yaml.safe_load(params.read_text())
    raw["train"].update(steps=13, eval_every=5)  # 96 images, batch 16: rounds end inside epochs
    params.write_text(yaml.safe_dump(raw))
    _run([sys.executable, "-m", "stages.launch", "train", "--params", str(params), "--data", str(tmp_path / "data")],
         _env())
    metrics = json.loads((tmp_path / "data" / "train_metrics.json").read_text())
    assert (metrics["budget"], metrics["steps"], metrics["epochs"]) == ("steps", 13, 2.1667)
    assert metrics["top1"] > 0.5  # it learned (chance 0.25)
    history = json.loads((tmp_path / "data" / "train" / "evaluation.json").read_text())["history"]
    assert [(r["step"], r["epoch"]) for r in history] == [(5, 0.8333), (10, 1.6667), (13, 2.1667)]


def test_launch_refuses_more_processes_than_gpus(tmp_path, monkeypatch, capsys):
    from dq.core.errors import run_cli
    from stages import launch

    params = _setup(tmp_path, device="auto", nproc=4)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(os, "execv", lambda *a: pytest.fail("torchrun must not start"))
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: launch.main(["train", "--params", str(params), "--data", str(tmp_path / "data")]))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: runtime.nproc = 4") and "2 visible CUDA device" in err


def test_torchrun_rendezvous_can_come_from_the_environment(monkeypatch):
    from stages import launch

    assert launch.torchrun_command("stages.train", 2, [])[3:5] == ["--standalone", "--nproc_per_node=2"]
    monkeypatch.setenv("DQ_TORCHRUN_ARGS", "--nnodes 2 --node_rank 0 --rdzv_endpoint node0:29500")
    cmd = launch.torchrun_command("stages.train", 8, ["--data", "d"])
    assert cmd[3:] == ["--nnodes", "2", "--node_rank", "0", "--rdzv_endpoint", "node0:29500",
                       "--nproc_per_node=8", "-m", "stages.train", "--data", "d"]


def test_parts_of_a_batch_cover_it_once_and_differ_by_at_most_one():
    for n, world in ((16, 2), (17, 4), (4, 2), (128, 3)):
        parts = [distributed.split(n, r, world) for r in range(world)]
        assert [i for p in parts for i in range(n)[p]] == list(range(n))
        sizes = [p.stop - p.start for p in parts]
        assert max(sizes) - min(sizes) <= 1


def test_scaled_part_losses_average_to_the_whole_batch_loss():
    """What DDP averages over ranks equals the gradient of the whole batch's mean loss, even for unequal parts."""
    torch.manual_seed(0)
    logits = torch.randn(7, 4, requires_grad=True)
    y = torch.randint(0, 4, (7,))
    whole = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, y), logits)[0]
    world = 2
    parts = [distributed.split(7, r, world) for r in range(world)]
    averaged = torch.zeros_like(logits)
    for part in parts:
        loss, summed = _batch_loss(logits[part], y[part], 7, world)
        averaged += torch.autograd.grad(loss, logits)[0] / world
        assert summed.dtype == torch.float64
    assert torch.allclose(averaged, whole, atol=1e-7)
    assert steps_per_epoch(33, 16, world=1) == 2 and steps_per_epoch(35, 16, world=2) == 2
    assert steps_per_epoch(36, 16, world=2) == 3


def test_too_small_a_batch_for_the_processes_is_one_line(monkeypatch):
    from dq.core.errors import DQError

    monkeypatch.setattr(distributed, "world_size", lambda: 4)
    train, test = blobs(16, seed=1), blobs(8, seed=2)
    with pytest.raises(DQError, match=r"train.batch_size = 4 is too small for 4 processes"):
        train_classifier(full_training_set(train), test,
                         TrainParams(model="test_resnet", input="full", epochs=1, batch_size=4),
                         seed=0, device=torch.device("cpu"), hooks=TrainHooks(progress=False))


def test_compress_on_two_ranks_writes_what_one_process_writes(tmp_path):
    """`python -m stages.launch compress` with runtime.nproc 2: each rank scores its shard of whole batches
    (12 selected images, batches of 4: rank 0 two, rank 1 one), rank 0 gathers and writes. The compact file,
    the metrics and the figure are those of one process, byte for byte."""
    from tests.test_format import _tiny_pipeline

    outputs = {}
    for nproc in (1, 2):
        root = _tiny_pipeline(tmp_path / str(nproc), batch_size=4)
        raw = yaml.safe_load((root / "params.yaml").read_text())
        raw["runtime"]["nproc"] = nproc
        (root / "params.yaml").write_text(yaml.safe_dump(raw))
        done = _run([sys.executable, "-m", "stages.launch", "compress", "--params", str(root / "params.yaml"),
                     "--data", str(root / "data")], _env())
        assert ("on 2 processes" in done.stderr) == (nproc == 2), done.stderr[-2000:]
        data = root / "data"
        outputs[nproc] = {name: _sha256(data / name) for name in
                          ("compact/dataset.h5", "compact_metrics.json", "compact_plots/patches.png")}
        assert not list(data.rglob(".*tmp*"))
    assert outputs[1] == outputs[2]


# Run by torchrun: three steps of a 10-row batch, each rank recording the logits of its part only.
RECORD_PARTS = textwrap.dedent('''
    import os, sys
    import numpy as np, torch
    from dq.core import distributed
    from dq.scores.dynamics import DynamicsRecorder
    with distributed.process_group(torch.device("cpu")):
        rank, world = distributed.rank(), distributed.world_size()
        rec = DynamicsRecorder(12, 99, el2n=None)
        gen = torch.Generator().manual_seed(0)
        for step in range(3):
            rows = torch.randperm(12, generator=gen)[:10].numpy()
            logits, y = torch.randn(10, 4, generator=gen), torch.randint(0, 4, (10,), generator=gen)
            part = distributed.split(10, rank, world)
            rec.record(rows, part, logits[part], y[part], model=None)
        np.savez(os.path.join(sys.argv[1], f"rank{rank}.npz"), **{k: v.numpy() for k, v in rec.state_dict().items()
                                                                  if k not in ("steps", "el2n")})
''')


def test_two_ranks_record_the_dynamics_of_the_whole_batch(tmp_path):
    """Under torchrun a rank sees the logits of its part of a batch only; the recorder sums the batch's margins
    over the ranks, so both ranks record what one process recording the whole batch does."""
    from dq.scores.dynamics import DynamicsRecorder

    (tmp_path / "record.py").write_text(RECORD_PARTS)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
          str(tmp_path / "record.py"), str(tmp_path)], _env())
    one = DynamicsRecorder(12, 99, el2n=None)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        rows = torch.randperm(12, generator=gen)[:10].numpy()
        logits, y = torch.randn(10, 4, generator=gen), torch.randint(0, 4, (10,), generator=gen)
        one.record(rows, slice(None), logits, y, model=None)
    for rank in (0, 1):
        got = np.load(tmp_path / f"rank{rank}.npz")
        for name, value in one.state_dict().items():
            if name not in ("steps", "el2n"):
                assert np.allclose(got[name], value.numpy(), rtol=0, atol=1e-12), (rank, name)
    assert (one.seen > 0).sum() == 12 and one.forgot.sum() > 0
