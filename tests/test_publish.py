"""`distillkit push`: what goes up (recorded from huggingface_hub's own HfApi calls, without a network), and
how it fails, for real, offline, without a token and with the Hub out of reach."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import timm
import torch
from huggingface_hub import HfApi, ModelCard, RepoUrl, constants
from huggingface_hub.errors import HfHubHTTPError
from typer.testing import CliRunner

import distillkit
from distillkit import publish
from distillkit.cli import app
from distillkit.errors import RunError, UsageError
from distillkit.export import CARD_FILE, CONFIG_FILE, WEIGHTS_FILE, export_student

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

WIDE = {"COLUMNS": "400"}  # rich wraps error messages at 80 columns

PROVENANCE = {
    "teacher": {"name": "timm:resnet18", "source": "timm hub (resnet18)"},
    "strategy": {"seed": {}},
    "data": "Fashion-MNIST (bundled subset)",
    "data_source": "builtin:fashion-mnist",
    "steps": 3,
    "distillkit_version": distillkit.__version__,
    "metrics": {"student": {"knn_top1": 0.5, "probe_top1": 0.625}},
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run folder as compress leaves it: the student export beside checkpoints and the run's own files."""
    run = tmp_path_factory.mktemp("run")
    model = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=0).eval()
    meta = dict(architecture="mobilenetv3_small_050", model_args={}, input_size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    export_student(model, run / "student", **meta, provenance=PROVENANCE)
    (run / "checkpoints" / "last").mkdir(parents=True)
    torch.save({"step": 3}, run / "checkpoints" / "last" / "state.pt")
    for name in ("recipe.yaml", "metrics.jsonl", "result.json", "report.html"):
        (run / name).write_text("{}", encoding="utf-8")
    return run


@pytest.fixture
def hub(monkeypatch):
    """HfApi's network calls replaced by recorders: `calls` holds each call's arguments, and for the upload
    the uploaded folder's files (name -> bytes), read while the call runs."""
    calls: dict[str, list] = {"whoami": [], "create_repo": [], "upload_folder": []}

    def whoami(self, token=None, **kwargs):
        calls["whoami"].append({"token": token or self.token})
        return {"name": "me"}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"].append({"repo_id": repo_id, **kwargs})
        full = repo_id if "/" in repo_id else f"me/{repo_id}"
        return RepoUrl(f"{constants.ENDPOINT}/{full}")

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        folder = Path(folder_path)
        files = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        calls["upload_folder"].append({"repo_id": repo_id, "folder": folder, "files": files, **kwargs})
        return SimpleNamespace(commit_url=f"{constants.ENDPOINT}/{repo_id}/commit/abc")

    monkeypatch.setattr(HfApi, "whoami", whoami)
    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return calls


def test_push_uploads_exactly_the_export_with_the_repo_in_its_card(run_dir, hub):
    student = run_dir / "student"
    card_before = (student / CARD_FILE).read_text(encoding="utf-8")
    result = distillkit.push(run_dir, "my-org/tiny-student", private=True, token="hf_test")
    assert hub["whoami"] == [{"token": "hf_test"}]
    (created,) = hub["create_repo"]
    assert created["repo_id"] == "my-org/tiny-student"
    assert created["private"] is True and created["exist_ok"] is True and created.get("repo_type") in (None, "model")
    (upload,) = hub["upload_folder"]
    assert upload["repo_id"] == "my-org/tiny-student" and upload.get("repo_type") in (None, "model")
    assert sorted(upload["files"]) == sorted([WEIGHTS_FILE, CONFIG_FILE, CARD_FILE])  # no checkpoints, no run files
    assert upload["files"][WEIGHTS_FILE] == (student / WEIGHTS_FILE).read_bytes()
    assert json.loads(upload["files"][CONFIG_FILE]) == json.loads((student / CONFIG_FILE).read_text())
    assert "timm:resnet18" in upload["commit_message"]
    card = upload["files"][CARD_FILE].decode()
    assert 'timm.create_model("hf-hub:my-org/tiny-student", pretrained=True)' in card and "ORG/NAME" not in card
    assert card.replace("my-org/tiny-student", "ORG/NAME") == card_before  # nothing else changed
    uploaded = ModelCard(card)
    assert uploaded.data.library_name == "timm" and uploaded.data.base_model == "timm/resnet18.a1_in1k"
    assert not upload["folder"].exists()  # the staging folder is gone
    assert (student / CARD_FILE).read_text(encoding="utf-8") == card_before  # the local card is untouched
    assert result.repo_id == "my-org/tiny-student" and result.url.endswith("/my-org/tiny-student")
    assert sorted(result.files) == sorted(upload["files"])


@pytest.mark.parametrize("where", ["student", "student/model.safetensors"])
def test_push_takes_the_export_folder_or_its_weights_and_a_bare_name(run_dir, hub, where):
    result = distillkit.push(run_dir / where, "tiny", token="hf_test")
    assert hub["create_repo"][0]["repo_id"] == "tiny" and hub["create_repo"][0]["private"] is False
    assert result.repo_id == "me/tiny"  # the token's namespace, as the Hub returns it
    assert "hf-hub:me/tiny" in hub["upload_folder"][0]["files"][CARD_FILE].decode()


def test_push_refuses_an_incomplete_export_before_any_request(run_dir, hub, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        (partial / name).write_bytes((run_dir / "student" / name).read_bytes())
    with pytest.raises(UsageError, match=r"not a complete timm export \(README.md missing\).*distillkit export"):
        distillkit.push(partial, "me/x", token="hf_test")
    onnx = tmp_path / "onnx"  # an ONNX export: config.json, model.onnx, README.md
    onnx.mkdir()
    for name in (CONFIG_FILE, CARD_FILE):
        (onnx / name).write_bytes((run_dir / "student" / name).read_bytes())
    (onnx / "model.onnx").write_bytes(b"onnx")
    with pytest.raises(UsageError, match="model.safetensors missing.*ONNX and TorchScript exports are not pushed"):
        distillkit.push(onnx, "me/x", token="hf_test")
    with pytest.raises(UsageError, match="does not exist"):
        distillkit.push(tmp_path / "nowhere", "me/x", token="hf_test")
    (partial / CARD_FILE).write_text("# card", encoding="utf-8")
    (partial / CONFIG_FILE).write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(UsageError, match="config.json is damaged"):
        distillkit.push(partial, "me/x", token="hf_test")
    with pytest.raises(UsageError, match="not a Hub repository id"):
        distillkit.push(run_dir, "my org/with spaces", token="hf_test")
    assert hub == {"whoami": [], "create_repo": [], "upload_folder": []}


@pytest.mark.parametrize(
    "status, error, message",
    [
        (401, UsageError, "the Hub refused the token.*hf auth login"),
        (403, UsageError, "the token may not write to my-org"),
        (500, RunError, "the Hub answered 500"),
    ],
)
def test_the_hubs_refusals_say_what_to_do(run_dir, hub, monkeypatch, status, error, message):
    def refuse(self, repo_id, **kwargs):
        raise HfHubHTTPError(
            f"{status} Client Error: no", response=SimpleNamespace(status_code=status, headers={}, request=None)
        )

    monkeypatch.setattr(HfApi, "create_repo", refuse)
    with pytest.raises(error, match=message):
        distillkit.push(run_dir, "my-org/x", token="hf_test")
    assert hub["upload_folder"] == []


def test_a_hub_that_never_answers_is_given_up_on(run_dir, hub, monkeypatch):
    monkeypatch.setattr(HfApi, "whoami", lambda self, **kwargs: time.sleep(30))
    monkeypatch.setattr(publish, "FIRST_CONTACT_S", 0.2)
    started = time.perf_counter()
    with pytest.raises(RunError, match="did not answer within"):
        distillkit.push(run_dir, "me/x", token="hf_test")
    assert time.perf_counter() - started < 5
    assert hub["create_repo"] == []


# ----------------------------------------------------------------------------- real failures, no mocks


@pytest.fixture
def unreachable_hub(monkeypatch, tmp_path):
    """The Hub at a closed local port (nothing listens: every connection is refused), no proxies, and an
    empty Hugging Face home (no stored token)."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy", "HF_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf" / "stored_tokens"))
    huggingface_hub.close_session()  # its client reads the proxy settings when it is created
    yield
    huggingface_hub.close_session()


def test_an_unreachable_hub_fails_fast_and_clearly(run_dir, unreachable_hub):
    started = time.perf_counter()
    with pytest.raises(RunError, match=r"Hub at http://127.0.0.1:9 could not be reached.*check the network"):
        distillkit.push(run_dir, "me/x", token="hf_test")
    assert time.perf_counter() - started < 5


def test_no_token_fails_before_any_request(run_dir, unreachable_hub):
    started = time.perf_counter()
    with pytest.raises(UsageError, match="token: no token was found.*hf auth login.*HF_TOKEN"):
        distillkit.push(run_dir, "me/x")
    assert time.perf_counter() - started < 5


def test_offline_mode_fails_at_once(run_dir, unreachable_hub, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UsageError, match="HF_HUB_OFFLINE is set"):
        distillkit.push(run_dir, "me/x", token="hf_test")


# ----------------------------------------------------------------------------- the command


def test_the_push_command(run_dir, hub):
    args = ["push", str(run_dir), "--repo-id", "my-org/x", "--private", "--token", "t"]
    result = CliRunner().invoke(app, args, env=WIDE)
    assert result.exit_code == 0, result.output
    assert "hf-hub:my-org/x" in result.output and "model.safetensors" in result.output
    assert hub["create_repo"][0]["private"] is True and hub["whoami"] == [{"token": "t"}]


def test_the_push_command_offline_and_with_a_bad_folder(run_dir, unreachable_hub, monkeypatch, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["push", str(tmp_path), "--repo-id", "me/x"], env=WIDE)
    assert result.exit_code == 2 and "not a complete timm export" in result.output
    result = runner.invoke(app, ["push", str(run_dir), "--repo-id", "me/x", "--token", "t"], env=WIDE)
    assert result.exit_code == 1 and "could not be reached" in result.output
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    result = runner.invoke(app, ["push", str(run_dir), "--repo-id", "me/x"], env=WIDE)
    assert result.exit_code == 2 and "HF_HUB_OFFLINE is set" in result.output
    assert "Traceback" not in result.output
