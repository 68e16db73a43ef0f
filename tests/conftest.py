import os

import pytest
import torch

# The suite's networks are tiny: on 2 cores one intra-op thread per process is faster than two (the whole
# suite: ~5.5 instead of ~8.5 minutes), and subprocesses (torchrun, fault_run.py) inherit the setting.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(autouse=True)
def private_user_cache(tmp_path_factory, monkeypatch):
    """Each test has its own empty user cache: it never reads or writes ~/.cache/distillkit, and the automatic
    teacher cache of one test never serves another's runs."""
    monkeypatch.setenv("DISTILLKIT_CACHE", str(tmp_path_factory.mktemp("distillkit-cache")))


@pytest.fixture(scope="module")
def one_cpu_thread():
    """Small models on a shared 2-core machine: one intra-op thread avoids OpenMP oversubscription
    (a 5 ms ViT-tiny forward took ~1 s with 2 threads while another process was busy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
