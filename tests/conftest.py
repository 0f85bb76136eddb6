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
def tiny_run(tmp_path_factory):
    """One tiny repo (tests/pipeline_repo.py) after a full `dvc repro`, committed; shared, never modified.

    Tests that change files copy them (or the whole repo) first.
    """
    from tests.pipeline_repo import all_stages, dvc, git, make_repo, ran_stages

    repo = make_repo(tmp_path_factory.mktemp("tiny_run") / "repo")
    out = dvc(repo, "repro")
    assert len(ran_stages(out.stdout)) == len(all_stages()), out.stdout
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "tiny run")
    return repo
