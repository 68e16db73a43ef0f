"""Hostile or broken teacher-weight files (issue 15, item 6): junk, truncated, text, HTML, Git-LFS pointers,
malicious pickles and wrong-but-valid checkpoints, generated here (>= 200). Each one is a `UsageError` that
names the file and says what it looks like; none runs code and none ends in a traceback."""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from distillkit.errors import UsageError
from distillkit.teachers import load_teacher

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

ARCH = "test_efficientnet"  # a 0.1 M parameter timm model: building it 200 times is cheap
MARKER = "distillkit-hostile-file-ran"


class Malicious:
    """Unpickling this runs `os.system`: a real attack, which safe loading must refuse."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def real_checkpoint() -> bytes:
    buffer = io.BytesIO()
    torch.save(timm.create_model(ARCH, num_classes=0).state_dict(), buffer)
    return buffer.getvalue()


def hostile_files(folder: Path, marker: Path) -> list[tuple[Path, str]]:
    """(file, what kind of file it is) for every generated case."""
    rng = np.random.default_rng(0)
    good = real_checkpoint()
    cases: list[tuple[str, bytes, str]] = []
    for i in range(70):  # random bytes of many lengths, some starting like a pickle or a zip
        head = [b"", b"\x80\x02", b"\x80\x04\x95", b"PK\x03\x04", b"{"][i % 5]
        cases.append((f"junk{i}.pth", head + rng.bytes(int(rng.integers(1, 4096))), "junk"))
    for i, cut in enumerate(np.linspace(10, len(good) - 10, 60).astype(int)):  # truncated real checkpoints
        cases.append((f"truncated{i}.pth", good[:cut], "truncated"))
    html = b"<!DOCTYPE html><html><head><title>404 Not Found</title></head><body>Not Found</body></html>"
    for i in range(10):
        cases.append((f"page{i}.pth", html * (i + 1), "html"))
    lfs = b"version https://git-lfs.github.com/spec/v1\noid sha256:%064x\nsize %d\n"
    for i in range(10):
        cases.append((f"lfs{i}.pth", lfs % (i, 1000 + i), "lfs"))
    for i in range(10):
        cases.append((f"text{i}.pth", ("weights go here\n" * (i + 1)).encode(), "text"))
    for i, payload in enumerate(
        [Malicious(marker), {"state_dict": Malicious(marker)}, [Malicious(marker)], {"w": Malicious(marker)}]
    ):
        for protocol in (2, 4, 5):
            cases.append((f"evil{i}-{protocol}.pth", pickle.dumps(payload, protocol=protocol), "malicious"))
    zipped = io.BytesIO()  # torch's zip layout around a malicious data.pkl
    with zipfile.ZipFile(zipped, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps(Malicious(marker)))
        archive.writestr("archive/version", "3\n")
    cases.append(("evil-zip.pth", zipped.getvalue(), "malicious"))
    for i, value in enumerate([42, "a string", [1, 2, 3], {"a": 1}, {}, torch.zeros(3), {"x": torch.zeros(2)}]):
        buffer = io.BytesIO()
        torch.save(value, buffer)
        cases.append((f"wrong{i}.pth", buffer.getvalue(), "wrong"))
    for i in range(20):  # safetensors: junk, a wrong header length, a truncated body, wrong tensors
        if i < 5:
            data = rng.bytes(int(rng.integers(1, 512)))
        elif i < 10:
            data = (10**9 + i).to_bytes(8, "little") + b'{"a":1}'
        else:
            path = folder / f"source{i}.safetensors"
            save_file({"weight": torch.zeros(4, 4 + i)}, str(path))
            data = path.read_bytes()
            path.unlink()
            data = data[: len(data) - 8] if i < 15 else data
        cases.append((f"st{i}.safetensors", data, "safetensors"))
    files = []
    for name, data, kind in cases:
        (folder / name).write_bytes(data)
        files.append((folder / name, kind))
    return files


def test_every_hostile_weights_file_is_a_clear_usage_error(tmp_path):
    marker = tmp_path / MARKER
    files = hostile_files(tmp_path, marker)
    assert len(files) >= 200
    wrong = []
    for path, kind in files:
        try:
            load_teacher(f"file:{path}", arch=ARCH, input_size=32)
        except UsageError as e:
            if str(path) not in str(e):
                wrong.append(f"{path.name} ({kind}): the message does not name the file: {e}")
            elif kind == "html" and "HTML" not in str(e):
                wrong.append(f"{path.name}: an HTML page not called one: {e}")
            elif kind == "lfs" and "Git LFS pointer" not in str(e):
                wrong.append(f"{path.name}: a Git LFS pointer not called one: {e}")
            elif kind == "text" and "text" not in str(e):
                wrong.append(f"{path.name}: a text file not called one: {e}")
        except Exception as e:  # noqa: BLE001 - exactly what must not happen
            wrong.append(f"{path.name} ({kind}): {type(e).__name__}: {str(e)[:200]}")
        else:
            wrong.append(f"{path.name} ({kind}): loaded")
    assert not marker.exists(), "a hostile file ran code"
    assert not wrong, f"{len(wrong)} of {len(files)} files:\n" + "\n".join(wrong[:30])
