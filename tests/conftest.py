"""Shared tiny fixtures: a generated log and a small model configuration."""

import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from hm4sr_dist.data.reader import collate
from hm4sr_dist.synthetic import generate_log, log_samples
from hm4sr_test_utils import prepare_sequence_log

pytest_plugins = ["suite_guards"]        # collection and process-leak guards (tests/suite_guards.py)

# Tiny tensors: one thread is faster than two fighting over the cores (Ray workers set their own).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_log():
    return generate_log(n_users=24, n_clusters=3, items_per_cluster=5, min_len=6, max_len=14,
                        text_width=6, image_width=5, seed=3)


@pytest.fixture
def tiny_batch(tiny_log):
    samples = log_samples(tiny_log, "train")[:9]
    return collate(samples, max_len=12)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


@pytest.fixture(scope="session")
def local_ray():
    """One embedded Ray for the whole session (each start costs seconds). `address="local"`: always
    a Ray of its own, never one that another process on this machine started."""
    import os

    import ray
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    return ray


@pytest.fixture(scope="session")
def prepared_sequences(tmp_path_factory, local_ray):
    """A generated log written as sequence files and prepared into shards by the real pipeline."""
    root = tmp_path_factory.mktemp("seq")
    return prepare_sequence_log(root, root / "prepared")


@pytest.fixture
def work():
    """A fresh, short temp folder (Ray's socket paths must stay under 107 bytes, were it to start)
    with `tmp/` (the jobs' RAY_TMPDIR, see hm4sr_test_utils.run) and `raw/`."""
    root = Path(tempfile.mkdtemp(prefix="cli"))
    (root / "tmp").mkdir()
    (root / "raw").mkdir()
    yield root
    shutil.rmtree(root, ignore_errors=True)
