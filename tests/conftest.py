import os

import pytest

# Tests never reach a model hub, and never phone home.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["DVC_NO_ANALYTICS"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module's tests: two OpenMP threads on a shared, busy 2-core machine spin far
    more than they compute. Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, worker_id):
    """One tiny repo (tests/pipeline_repo.py) after a full `dvc repro`, committed; shared, never modified.

    Tests that change files copy them (or the whole repo) first. Under pytest-xdist every worker shares the one
    run: the first to ask builds it under a file lock, in the folder that holds all the workers' temp folders.
    """
    from filelock import FileLock

    from tests.pipeline_repo import all_stages, dvc, git, make_repo, ran_stages

    root = tmp_path_factory.getbasetemp()
    if worker_id != "master":
        root = root.parent
    repo, done = root / "tiny_run" / "repo", root / "tiny_run.done"
    with FileLock(str(root / "tiny_run.lock")):
        if not done.exists():
            make_repo(repo)
            out = dvc(repo, "repro")
            assert len(ran_stages(out.stdout)) == len(all_stages()), out.stdout
            git(repo, "add", "-A")
            git(repo, "commit", "-q", "-m", "tiny run")
            done.touch()
    return repo
