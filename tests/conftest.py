import contextlib
import logging
import os
import re

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


@pytest.fixture
def tells(caplog):
    """`with tells(pattern):` checks that distillkit told its user (logger "distillkit", distillkit/messages.py)
    a message matching `pattern` (re.search) while the block ran: what pytest.warns did for warnings."""

    @contextlib.contextmanager
    def check(pattern: str):
        start = len(caplog.records)
        with caplog.at_level(logging.WARNING, logger="distillkit"):
            yield
        said = [r.getMessage() for r in caplog.records[start:] if r.name == "distillkit"]
        assert any(re.search(pattern, m) for m in said), f"no message matching {pattern!r} among {said}"

    return check


@pytest.fixture(scope="module")
def one_cpu_thread():
    """Small models on a shared 2-core machine: one intra-op thread avoids OpenMP oversubscription
    (a 5 ms ViT-tiny forward took ~1 s with 2 threads while another process was busy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CLOSED_PORT_PROXY = "http://127.0.0.1:9"  # the discard port: nothing listens, every connection is refused


@pytest.fixture
def no_network(monkeypatch, tmp_path_factory):
    """A real network failure for urllib and huggingface_hub alike, whatever this machine's connection: every
    request goes to a proxy on a closed local port. The Hugging Face cache is a fresh empty folder."""
    import huggingface_hub
    from huggingface_hub import constants

    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.setenv(name, CLOSED_PORT_PROXY)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path_factory.mktemp("hf-cache")))
    huggingface_hub.close_session()  # its client reads the proxy settings when it is created
    yield
    huggingface_hub.close_session()


@pytest.fixture(scope="session")
def pretrained_bootleg(tmp_path_factory):
    """A real self-supervised MIM-style teacher: a 2-block ViT (patch 4 at 32 px, an 8x8 grid, 64-d) pretrained
    with `distillkit pretrain bootleg` for 24 steps on the bundled / Debian Fashion-MNIST; its bootleg.pth.
    Its attention is learned, not random, which is what the tests of teachers "with real attention" need."""
    from distillkit.pretrain import pretrain

    out = tmp_path_factory.mktemp("bootleg-teacher") / "run"
    args = "{patch_size: 4, depth: 2, embed_dim: 64, num_heads: 2, class_token: false, global_pool: avg}"
    result = pretrain(
        out=out,
        limit=640,
        batch_size=32,
        max_steps=24,
        seed=0,
        quiet=True,
        set=[
            "student.input_size=32",
            f"student.model_args={args}",
            "strategy.bootleg.predictor_depth=1",
            "strategy.bootleg.predictor_width=32",
            "strategy.bootleg.predictor_heads=2",
            "strategy.bootleg.ema=[0.99, 0.995]",
            "train.lr=0.002",
            "eval.enabled=false",
        ],
    )
    return result.checkpoint
