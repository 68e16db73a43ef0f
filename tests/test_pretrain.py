"""`distillkit pretrain bootleg`: the EMA, the targets, the masks, the run, its files, resume and 2 processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

from distillkit.errors import UsageError
from distillkit.features import FeatureRequest
from distillkit.pretrain import pretrain
from distillkit.strategies.bootleg import (
    Bootleg,
    BootlegConfig,
    default_target_layers,
    ema_momentum,
    ema_update,
    target_spread,
)

FAULT_RUN = Path(__file__).parent / "helpers" / "fault_run.py"
GAP = dict(class_token=False, global_pool="avg", fc_norm=False)
TINY_ARGS = "{patch_size: 4, depth: 2, embed_dim: 32, num_heads: 2, class_token: false, global_pool: avg}"


def tiny_vit(size: int = 32, depth: int = 2, dim: int = 32) -> torch.nn.Module:
    torch.manual_seed(0)
    shape = dict(img_size=size, patch_size=4, depth=depth, embed_dim=dim, num_heads=2)
    return timm.create_model("vit_tiny_patch16_224", num_classes=0, **shape, **GAP)


def tiny_config(**changes) -> BootlegConfig:
    return BootlegConfig(predictor_depth=1, predictor_width=16, predictor_heads=2, **changes)


def test_ema_update_is_the_hand_computed_average():
    target, online = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in target.parameters()]
    ema_update(target, online, 0.9)
    for new, old, o in zip(target.parameters(), before, online.parameters()):
        assert torch.allclose(new, 0.9 * old + 0.1 * o.detach())


def test_momentum_goes_linearly_from_the_first_to_the_last_value():
    # I-JEPA: m_i = ema0 + i * (ema1 - ema0) / total
    assert ema_momentum((0.996, 1.0), 0.0) == 0.996
    assert ema_momentum((0.996, 1.0), 0.25) == pytest.approx(0.996 + 0.25 * 0.004)
    assert ema_momentum((0.996, 1.0), 1.0) == 1.0


def test_default_target_layers_are_every_fourth_block_back_from_the_last():
    assert default_target_layers(12) == [3, 7, 11]
    assert default_target_layers(6) == [1, 5]
    assert default_target_layers(2) == [1]


def test_targets_are_the_layer_normed_hidden_states_of_the_ema_encoder_concatenated():
    student = tiny_vit(depth=4)
    strategy = Bootleg(tiny_config(layers=[0, 2]), student)
    with torch.no_grad():  # the EMA copy drifts away from the student so a mix-up would show
        for p in strategy.target_encoder.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(3, 3, 32, 32)
    features = strategy.student_features(student, x, {}, FeatureRequest(), 0.0)
    # by hand: patch embed + positions, the blocks one by one, each tapped output z-scored per token
    with torch.no_grad():
        target = strategy.target_encoder
        tokens = target.patch_embed(x) + target.pos_embed
        taps = []
        for index, block in enumerate(target.blocks):
            tokens = block(tokens)
            if index in (0, 2):
                mean, var = tokens.mean(-1, keepdim=True), tokens.var(-1, unbiased=False, keepdim=True)
                taps.append((tokens - mean) / torch.sqrt(var + 1e-5))
    assert torch.allclose(features.targets, torch.cat(taps, dim=-1), atol=1e-5)
    # the same construction as strategy hidden's from a frozen teacher with those weights
    from distillkit.features import extract_features
    from distillkit.strategies.hidden import normalised_targets

    hidden = extract_features(target, x, FeatureRequest(layers=(0, 2))).layers
    assert torch.equal(features.targets, normalised_targets([hidden[0], hidden[2]], (8, 8)))


def test_the_context_never_holds_a_target_patch():
    student = tiny_vit(size=56)  # a 14 x 14 grid: no relaxation of the exclusions is needed
    strategy = Bootleg(tiny_config(), student)
    torch.manual_seed(1)
    for _ in range(5):
        features = strategy.student_features(student, torch.randn(8, 3, 56, 56), {}, FeatureRequest(), 0.0)
        for image in range(8):
            context = set(features.context_index[image].tolist())
            for block in features.target_index[:, image]:
                assert not context & set(block.tolist())


def test_a_gradient_step_moves_the_student_and_the_ema_follows_at_its_momentum():
    student = tiny_vit()
    strategy = Bootleg(tiny_config(ema=(0.5, 0.5)), student)
    from distillkit.strategies.base import StepInputs

    features = strategy.student_features(student, torch.randn(4, 3, 32, 32), {}, FeatureRequest(), 0.0)
    step = StepInputs(teacher_views=[], student_views=[features], labels=None, progress=0.0)
    loss = strategy(step)["bootleg"]
    loss.backward()
    assert all(p.grad is None for p in strategy.target_encoder.parameters())  # no gradient reaches the targets
    before = [p.detach().clone() for p in strategy.target_encoder.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.sub_(0.1 * p.grad)
    step.optimizer_stepped = False  # a micro-batch of an accumulation: nothing moves yet
    strategy.after_step(step, lambda t: t)
    assert all(torch.equal(a, b) for a, b in zip(before, strategy.target_encoder.parameters()))
    step.optimizer_stepped = True
    strategy.after_step(step, lambda t: t)
    for new, old, s in zip(strategy.target_encoder.parameters(), before, student.parameters()):
        assert torch.allclose(new, 0.5 * old + 0.5 * s.detach())


def test_target_spread_is_zero_for_a_collapsed_target_and_the_run_is_warned():
    collapsed = torch.ones(4, 16, 8)
    assert target_spread(collapsed) == 0
    strategy = Bootleg(tiny_config(collapse_std=0.05), tiny_vit())
    assert strategy.health({"bootleg.target_std": 0.5}) is None
    warning = strategy.health({"bootleg.target_std": 0.001})
    assert "collapsing" in warning and "strategy.bootleg.ema" in warning


def test_a_cnn_or_a_too_small_grid_is_refused_with_what_to_pass():
    cnn = timm.create_model("resnet18", num_classes=0)
    with pytest.raises(UsageError, match="--arch vit_small_patch16_224"):
        Bootleg.check_student(BootlegConfig(), cnn)
    with pytest.raises(UsageError, match="grid"):
        Bootleg.check_student(BootlegConfig(), tiny_vit(size=8))
    with pytest.raises(UsageError, match="ema"):
        BootlegConfig(ema=(1.0, 0.9))


# ----------------------------------------------------------------------------- whole runs


def run_options(out: Path, steps: int = 12) -> dict:
    return dict(
        out=out,
        limit=256,
        batch_size=32,
        max_steps=steps,
        seed=2,
        quiet=True,
        set=[
            "student.input_size=32",
            f"student.model_args={TINY_ARGS}",
            "strategy.bootleg.layers=null",
            "strategy.bootleg.ema=[0.996, 1.0]",  # I-JEPA's: a slow target, so the loss can only fall by learning
            "strategy.bootleg.predictor_depth=1",
            "strategy.bootleg.predictor_width=32",
            "strategy.bootleg.predictor_heads=2",
            "train.log_every=1",
            "train.lr=0.002",
            "train.deterministic=true",
            "eval.max_train=256",
            "eval.max_test=128",
            "eval.online_images=0",
            "eval.latency_runs=1",
        ],
    )


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain") / "run"
    return pretrain(**run_options(out, steps=30))


def test_a_run_writes_an_ijepa_checkpoint_and_a_timm_teacher(pretrained):
    checkpoint = torch.load(pretrained.checkpoint, weights_only=True)
    assert {"encoder", "predictor", "target_encoder", "epoch", "step", "args"} <= set(checkpoint)
    assert checkpoint["step"] == 30
    for part in ("encoder", "predictor", "target_encoder"):
        assert all(key.startswith("module.") for key in checkpoint[part])
    assert "module.predictor_blocks.0.attn.qkv.weight" in checkpoint["predictor"]
    assert "module.predictor_pos_embed" in checkpoint["predictor"]
    args = checkpoint["args"]
    assert args["arch"] == "vit_tiny_patch16_224" and args["model_kwargs"]["depth"] == 2
    # the exported teacher is the target encoder, loadable by plain timm
    model = timm.create_model(f"local-dir:{pretrained.teacher_dir}", pretrained=True)
    target = {k[len("module.") :]: v for k, v in checkpoint["target_encoder"].items()}
    assert model.state_dict().keys() == target.keys()
    assert all(torch.equal(model.state_dict()[k], target[k]) for k in target)
    encoder = {k[len("module.") :]: v for k, v in checkpoint["encoder"].items()}
    assert any(not torch.equal(encoder[k], target[k]) for k in target)  # two networks, not one saved twice
    assert set(pretrained.metrics) >= {"target_encoder", "encoder", "random_init"}
    card = (pretrained.teacher_dir / "README.md").read_text()
    assert "pretrained with distillkit (bootleg)" in card and "Teacher: None" not in card
    knn = pretrained.metrics["target_encoder"]["knn_top1"]  # the card carries the run's own accuracies
    assert f"| this network (the EMA target encoder) | {100 * knn:.2f} % |" in card
    assert f"| the same network at random init | {100 * pretrained.metrics['random_init']['knn_top1']:.2f} % |" in card


def test_the_loss_falls(pretrained):
    losses = [r["loss"] for r in records(pretrained.run_dir) if "loss" in r and "epoch_end" not in r]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.95 * sum(losses[:5]) / 5  # measured: 0.38 after 0.42
    assert all("bootleg.target_std" in r for r in records(pretrained.run_dir) if "loss" in r)


def test_the_pretrained_teacher_distils_into_a_student(pretrained, tmp_path):
    from distillkit.api import compress

    result = compress(
        teacher="bootleg",
        teacher_weights=pretrained.checkpoint,
        student="timm:resnet18",
        max_steps=3,
        limit=128,
        batch_size=32,
        out=tmp_path / "distil",
        quiet=True,
        set=["student.input_size=32", "eval.enabled=false", "data.teacher_cache=null", "eval.online_images=0"],
    )
    assert result.steps == 3
    config = json.loads((result.student_dir / "config.json").read_text())
    assert "bootleg" in config["distillkit"]["teacher"]["name"]


def test_overwrite_replaces_a_pretraining_run_and_keeps_refusing_foreign_files(tmp_path):
    out = tmp_path / "run"
    options = run_options(out, steps=2) | {"set": run_options(out)["set"] + ["eval.enabled=false"]}
    pretrain(**options)
    with pytest.raises(UsageError, match="--overwrite"):
        pretrain(**options)
    again = pretrain(**options, overwrite=True)  # bootleg.pth and teacher/ are the run's own files
    assert again.checkpoint.is_file() and (again.teacher_dir / "model.safetensors").is_file()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UsageError):
        pretrain(**options, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"


def test_a_compress_recipe_is_refused_by_pretrain(tmp_path):
    with pytest.raises(UsageError, match="pretraining recipe"):
        pretrain(recipe="default", out=tmp_path / "x", quiet=True)
    with pytest.raises(UsageError, match="no teacher"):
        from distillkit.api import compress

        compress(recipe="pretrain-bootleg-tiny", out=tmp_path / "y", quiet=True)


def subprocess_cli_args(out: Path) -> list[str]:
    """The CLI options of the subprocess runs: 8 steps (2 epochs of 4), a checkpoint every 4 steps."""
    options = run_options(out)
    args = ["--out", str(out), "--limit", "128", "--batch-size", "32", "--epochs", "2", "--seed", "2", "--quiet"]
    for item in options["set"] + ["train.checkpoint_every=4", "eval.enabled=false"]:
        args += ["--set", item]
    return args


def run_pretrain_cli(*args: str, launcher: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    command = [*launcher, str(FAULT_RUN), "--command", "pretrain", "bootleg", *args]
    if not launcher:
        command.insert(0, sys.executable)
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory) -> Path:
    """One uninterrupted 1-process run: the reference of the kill/resume and the 2-process tests."""
    out = tmp_path_factory.mktemp("one") / "run"
    one = run_pretrain_cli("--", *subprocess_cli_args(out))
    assert one.returncode == 0, one.stderr[-3000:]
    return out


def test_killed_and_resumed_equals_uninterrupted(tmp_path, one_process_run):
    """A real SIGKILL right after step 4's checkpoint (the end of epoch 1), then `--resume`: the same checkpoint as
    one run."""
    killed = run_pretrain_cli("--kill-after-checkpoint", "4", "--", *subprocess_cli_args(tmp_path / "killed"))
    assert killed.returncode == -9, killed.stderr[-3000:]
    resumed = run_pretrain_cli("--", *subprocess_cli_args(tmp_path / "killed"), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = torch.load(one_process_run / "bootleg.pth", weights_only=True)
    b = torch.load(tmp_path / "killed" / "bootleg.pth", weights_only=True)
    for part in ("encoder", "predictor", "target_encoder"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part


def test_two_processes_match_one(tmp_path, one_process_run):
    from test_distributed import free_port

    torchrun = (sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2")
    torchrun += ("--master_addr", "127.0.0.1", "--master_port", str(free_port()))
    two = run_pretrain_cli("--", *subprocess_cli_args(tmp_path / "two"), launcher=torchrun)
    assert two.returncode == 0, two.stderr[-3000:]
    la = [r["loss"] for r in records(one_process_run) if "loss" in r and "epoch_end" not in r]
    lb = [r["loss"] for r in records(tmp_path / "two") if "loss" in r and "epoch_end" not in r]
    assert len(la) == len(lb) == 8
    assert la == pytest.approx(lb, rel=1e-4, abs=1e-5)
    a = torch.load(one_process_run / "bootleg.pth", weights_only=True)
    b = torch.load(tmp_path / "two" / "bootleg.pth", weights_only=True)
    for part in ("encoder", "target_encoder"):  # the EMA follows the same student in both
        assert all(torch.allclose(a[part][k], b[part][k], rtol=1e-4, atol=1e-5) for k in a[part]), part
    assert F.mse_loss(a["predictor"]["module.mask_token"], b["predictor"]["module.mask_token"]) < 1e-8
