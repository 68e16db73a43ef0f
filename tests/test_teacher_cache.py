"""The teacher-output cache: a cached run trains exactly like an uncached run over the same views, the
teacher is not run for cached views, and a changed teacher, image or augmentation never reads stale outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import distillkit
from distillkit.data.views import DEFAULT_CACHE_SLOTS, view_slots
from distillkit.errors import UsageError
from distillkit.features import Features
from distillkit.teachers.base import Teacher
from distillkit.train import step
from distillkit.train.cache import TeacherCache, image_hashes

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

TINY = [
    "teacher.input_size=32",
    "strategy.seed.queue_size=64",
    "eval.enabled=false",
    "train.deterministic=true",
    "data.cache_dtype=float32",
]


def run(out: Path, cache: Path | None, epochs: int = 2, extra: list[str] = (), **kwargs):
    """`cache` None: no teacher cache at all (not the automatic one)."""
    return distillkit.compress(
        student="mobilenetv3-small",
        data="builtin:fashion-mnist",
        limit=64,
        batch_size=32,
        epochs=epochs,
        out=out,
        quiet=True,
        teacher_cache=False if cache is None else cache,
        set=TINY + ["data.view_slots=1"] + list(extra),
        **kwargs,
    )


def losses(run_dir: Path) -> list[float]:
    return [
        json.loads(line)["loss"]
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if '"step"' in line and "epoch_end" not in line
    ]


class Calls(list):
    """The batch sizes the teacher was called with; `.sizes` the (height, width) of its views."""

    def __init__(self):
        super().__init__()
        self.sizes = []


@pytest.fixture
def teacher_calls(monkeypatch):
    calls = Calls()
    original = Teacher.forward

    def counting(self, views, request):
        calls.append(views.shape[0])
        calls.sizes.append(tuple(views.shape[-2:]))
        return original(self, views, request)

    monkeypatch.setattr(Teacher, "forward", counting)
    return calls


def test_views_are_rendered_shared_per_network_or_at_view_size(tmp_path, teacher_calls, monkeypatch):
    student_sizes = []
    original = step.DistillModule.forward

    def recording(self, views, *args):
        student_sizes.extend(tuple(v.shape[-2:]) for v in views)
        return original(self, views, *args)

    monkeypatch.setattr(step.DistillModule, "forward", recording)
    run(
        tmp_path / "own",
        None,
        epochs=1,
        extra=["teacher.input_size=48", "student.input_size=32", "data.render=per_network"],
    )
    assert set(teacher_calls.sizes[-2:]) == {(48, 48)} and set(student_sizes) == {(32, 32)}
    teacher_calls.sizes.clear(), student_sizes.clear()
    run(
        tmp_path / "shared",
        None,
        epochs=1,
        extra=["teacher.input_size=48", "student.input_size=32", "data.render=shared"],
    )
    assert set(teacher_calls.sizes[-2:]) == {(48, 48)} and set(student_sizes) == {(48, 48)}
    teacher_calls.sizes.clear(), student_sizes.clear()
    run(tmp_path / "fixed", None, epochs=1, extra=["teacher.input_size=48", "data.view_size=40"])
    assert set(teacher_calls.sizes[-2:]) == {(40, 40)} and set(student_sizes) == {(40, 40)}


def test_a_cached_run_gives_the_losses_of_an_uncached_run_and_skips_the_teacher(tmp_path, teacher_calls):
    plain = run(tmp_path / "plain", None, extra=["train.log_every=1"])
    assert teacher_calls.count(32) == 4  # 2 epochs x 2 batches of 32
    teacher_calls.clear()
    cached = run(tmp_path / "cached", tmp_path / "cache", extra=["train.log_every=1"])
    assert losses(cached.run_dir) == pytest.approx(losses(plain.run_dir), rel=1e-6)
    assert teacher_calls.count(32) == 2  # epoch 1 fills the cache, epoch 2 reads it
    # a second student of the same teacher, views and data reuses the entry: no teacher batch at all
    teacher_calls.clear()
    again = run(tmp_path / "again", tmp_path / "cache", epochs=1, extra=["train.log_every=1"])
    assert teacher_calls.count(32) == 0
    assert losses(again.run_dir) == pytest.approx(losses(plain.run_dir)[:2], rel=1e-6)
    assert len(list((tmp_path / "cache").iterdir())) == 1


def test_every_teacher_role_is_cached_with_its_dense_targets(tmp_path, teacher_calls):
    """agglomerate with two teachers at their own sizes (Lite0 at 32 px and a random ViT-Tiny at 48 px): each role
    gets its own entry holding its embedding and its last token map, and the cached run replays both."""
    two_teachers = [
        "teachers.vit.name=timm:vit_tiny_patch16_224",
        "teachers.vit.weights=random",
        "teachers.vit.input_size=48",
        "train.log_every=1",
    ]
    options = dict(strategy="agglomerate", extra=two_teachers)
    plain = run(tmp_path / "plain", None, **options)
    assert sorted(set(teacher_calls.sizes)) == [(32, 32), (48, 48)] and teacher_calls.count(32) == 8  # 2 roles x 4
    teacher_calls.clear()
    cached = run(tmp_path / "cached", tmp_path / "cache", **options)
    assert losses(cached.run_dir) == pytest.approx(losses(plain.run_dir), rel=1e-5)
    assert teacher_calls.count(32) == 4  # epoch 1 fills both entries, epoch 2 reads them
    metas = [json.loads((entry / "meta.json").read_text()) for entry in (tmp_path / "cache").iterdir()]
    stored = {m["key"]["teacher"]: set(m["shapes"]) for m in metas}
    assert stored.keys() == {"efficientnet-lite0", "timm:vit_tiny_patch16_224"}
    assert all("embedding" in names and any(n.startswith("layers.") for n in names) for names in stored.values())


def test_a_teacher_under_another_role_name_reads_the_same_entry(tmp_path, teacher_calls):
    """Entries are keyed by what the teacher computes, not by the role's name: an agglomerate run whose two roles
    are the very teacher another run cached (once as `teacher`, once as `twin`) reads that one entry for both."""
    alone = run(tmp_path / "alone", tmp_path / "cache", epochs=1, strategy="agglomerate")
    assert teacher_calls.count(32) == 2 and len(list((tmp_path / "cache").iterdir())) == 1
    teacher_calls.clear()
    twin = ["teachers.twin.name=efficientnet-lite0", "teachers.twin.input_size=32"]
    both = run(tmp_path / "both", tmp_path / "cache", epochs=1, strategy="agglomerate", extra=twin)
    assert teacher_calls.count(32) == 0  # neither role ran its teacher
    assert len(list((tmp_path / "cache").iterdir())) == 1
    assert both.steps == alone.steps


def test_two_roles_of_one_teacher_fill_one_entry(tmp_path, teacher_calls):
    twin = ["teachers.twin.name=efficientnet-lite0", "teachers.twin.input_size=32"]
    plain = run(tmp_path / "plain", None, strategy="agglomerate", extra=twin)
    teacher_calls.clear()
    cached = run(tmp_path / "cached", tmp_path / "cache", strategy="agglomerate", extra=twin)
    assert teacher_calls.count(32) == 2  # epoch 1: one role computes and fills, the other reads; epoch 2 reads
    assert len(list((tmp_path / "cache").iterdir())) == 1
    # the role that reads gets the stored float32 copy of what the other computed: the same training
    assert losses(cached.run_dir) == pytest.approx(losses(plain.run_dir), rel=1e-5)


def test_students_of_other_strategies_and_seeds_share_an_entry(tmp_path, teacher_calls):
    run(tmp_path / "a", tmp_path / "cache", epochs=1, extra=["data.view_seed=7"], seed=1)
    assert teacher_calls.count(32) == 2
    teacher_calls.clear()
    # another strategy reading the same embedding: nothing to compute
    run(tmp_path / "b", tmp_path / "cache", epochs=1, extra=["data.view_seed=7"], seed=1, strategy="feature")
    assert teacher_calls.count(32) == 0
    # another train.seed with the same view_seed: the same entry (its --limit draws other images, which are added)
    run(tmp_path / "c", tmp_path / "cache", epochs=1, extra=["data.view_seed=7"], seed=2)
    assert len(list((tmp_path / "cache").iterdir())) == 1
    # without view_seed the views follow train.seed: another entry
    run(tmp_path / "d", tmp_path / "cache", epochs=1, seed=2)
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_other_views_or_another_teacher_open_another_entry(tmp_path):
    run(tmp_path / "a", tmp_path / "cache", epochs=1)
    run(tmp_path / "b", tmp_path / "cache", epochs=1, extra=["teacher.input_size=48", "data.crop_scale=[0.5, 1.0]"])
    entries = list((tmp_path / "cache").iterdir())
    assert len(entries) == 2
    keys = [json.loads((e / "meta.json").read_text())["key"] for e in entries]
    assert len({k["weights_sha256"] for k in keys}) == 1  # the same teacher at another input size and views
    assert len({json.dumps(k["input"]) for k in keys}) == 2 and len({json.dumps(k["views"]) for k in keys}) == 2


AUGMENT = [
    "data.augment.jitter=0.8",
    "data.augment.brightness=0.4",
    "data.augment.contrast=0.4",
    "data.augment.grayscale=0.2",
    "data.augment.blur=0.5",
    "data.augment.solarize=0.2",
]


def test_augmented_views_replay_from_the_cache_and_key_their_entry(tmp_path, teacher_calls):
    """With photometric augmentation the teacher's cached outputs are for the augmented views: a cached run
    trains exactly like an uncached one, and other augmentation settings open another entry."""
    plain = run(tmp_path / "plain", None, extra=AUGMENT + ["train.log_every=1"])
    cached = run(tmp_path / "cached", tmp_path / "cache", extra=AUGMENT + ["train.log_every=1"])
    assert losses(cached.run_dir) == pytest.approx(losses(plain.run_dir), rel=1e-6)
    run(tmp_path / "other", tmp_path / "cache", epochs=1, extra=AUGMENT[:-1])
    keys = [json.loads((e / "meta.json").read_text())["key"] for e in (tmp_path / "cache").iterdir()]
    assert len(keys) == 2 and {k["views"]["augment"]["solarize"] for k in keys} == {0.2, 0.0}


def test_the_loop_trains_on_augmented_views(tmp_path, teacher_calls, monkeypatch):
    """Solarisation with probability 1 turns every pixel >= 0.5 into 1 - x: no view pixel is above 0.5."""
    seen = []
    original = step.DistillModule.forward

    def recording(self, views, *args):
        seen.extend(views)
        return original(self, views, *args)

    monkeypatch.setattr(step.DistillModule, "forward", recording)
    run(tmp_path / "plain", None, epochs=1, extra=["train.max_steps=1"])
    assert max(float(v.max()) for v in seen) > 0.9  # Fashion-MNIST has bright pixels
    seen.clear()
    run(tmp_path / "solarized", None, epochs=1, extra=["train.max_steps=1", "data.augment.solarize=1.0"])
    assert max(float(v.max()) for v in seen) <= 0.5 + 1e-6


def test_changed_weights_change_the_key(tmp_path):
    from distillkit.train.cache import weights_hash

    model = torch.nn.Linear(3, 2)
    before = weights_hash(model)
    with torch.no_grad():
        model.weight[0, 0] += 1e-6
    assert weights_hash(model) != before


def probe() -> Features:
    return Features(
        embedding=torch.zeros(1, 4),
        layers={2: torch.zeros(1, 3, 2, 2)},
        relations={1: torch.zeros(2, 1, 2, 5, 4)},
        prefix_tokens=1,
    )


def test_a_changed_image_is_refused(tmp_path):
    cache = TeacherCache(tmp_path, {"k": 1}, probe(), num_images=10, slots=2, views=1, dtype="float32", create=True)
    images = torch.randint(0, 255, (2, 1, 8, 8), dtype=torch.uint8)
    indices = torch.tensor([3, 7])
    outputs = [
        Features(
            embedding=torch.randn(2, 4),
            layers={2: torch.randn(2, 3, 2, 2)},
            relations={1: torch.randn(2, 2, 2, 5, 4)},
            prefix_tokens=1,
        )
    ]
    cache.features(indices, images, 0, lambda: outputs, torch.device("cpu"))
    read = cache.features(
        indices, images, 0, lambda: pytest.fail("the teacher ran for cached views"), torch.device("cpu")
    )
    for name, tensor in outputs[0].named().items():
        torch.testing.assert_close(read[0].named()[name], tensor)
    changed = images.clone()
    changed[1, 0, 0, 0] ^= 1
    with pytest.raises(UsageError, match="image 7 is not the image"):
        cache.features(indices, changed, 1, lambda: outputs, torch.device("cpu"))


def test_a_meta_file_that_does_not_match_is_refused(tmp_path):
    TeacherCache(tmp_path, {"k": 1}, probe(), num_images=4, slots=1, views=1, dtype="float16", create=True)
    (entry,) = tmp_path.iterdir()
    meta = json.loads((entry / "meta.json").read_text())
    meta["key"]["k"] = 2
    (entry / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UsageError, match="does not match this run .*different: k"):
        TeacherCache(tmp_path, {"k": 1}, probe(), num_images=4, slots=1, views=1, dtype="float16", create=True)


def test_features_round_trip_through_names():
    features = probe()
    features.block_embeddings = {0: torch.zeros(1, 3)}
    back = Features.from_named(features.named(), features.prefix_tokens)
    assert set(back.named()) == {"embedding", "layers.2", "relations.1", "block_embeddings.0"}
    assert back.prefix_tokens == 1


def test_image_hashes_see_every_pixel_and_are_never_zero():
    images = torch.zeros(3, 1, 4, 4, dtype=torch.uint8)
    images[1, 0, 3, 3] = 1
    hashes = image_hashes(images)
    assert hashes[0] == hashes[2] != hashes[1] and (hashes != 0).all() and hashes.dtype == np.int64


def test_view_slots_cycle_the_views():
    recipe = distillkit.recipe.resolve_recipe({"data": {"teacher_cache": "x"}})
    assert view_slots(recipe.data) == DEFAULT_CACHE_SLOTS
    assert view_slots(distillkit.recipe.resolve_recipe({}).data) is None  # auto: no fixed views unless asked
    assert view_slots(distillkit.recipe.resolve_recipe({"data": {"teacher_cache": None}}).data) is None
    with pytest.raises(UsageError, match="view_slots"):
        distillkit.recipe.resolve_recipe({"data": {"view_slots": 0}})


# ----------------------------------------------------------------------------- safe to share (issue 15, item 5)


def outputs_of(batch: int, fill: float | None = None) -> list[Features]:
    out = Features(
        embedding=torch.randn(batch, 4),
        layers={2: torch.randn(batch, 3, 2, 2)},
        relations={1: torch.randn(2, batch, 2, 5, 4)},
        prefix_tokens=1,
    )
    if fill is not None:
        out.embedding[1, 0] = fill
    return [out]


@pytest.mark.parametrize("missing", ["embedding.bin", "filled.bin"])
def test_a_damaged_entry_is_reported_with_what_to_delete(tmp_path, missing):
    TeacherCache(tmp_path, {"k": 1}, probe(), num_images=4, slots=1, views=1, dtype="float32", create=True)
    (entry,) = tmp_path.iterdir()
    (entry / missing).unlink()
    with pytest.raises(UsageError, match=rf"teacher cache entry {entry} is damaged .*{missing}.*delete that folder"):
        TeacherCache(tmp_path, {"k": 1}, probe(), num_images=4, slots=1, views=1, dtype="float32", create=True)
    (entry / missing).write_bytes(b"\0" * 8)  # present but truncated
    with pytest.raises(UsageError, match=rf"teacher cache entry {entry} is damaged"):
        TeacherCache(tmp_path, {"k": 1}, probe(), num_images=4, slots=1, views=1, dtype="float32", create=True)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_teacher_outputs_are_never_stored(tmp_path, bad):
    """A row with a NaN or inf output is handed to training as computed but not written, so the next epoch
    computes it again; the finite rows of the same batch are cached."""
    cache = TeacherCache(tmp_path, {"k": 1}, probe(), num_images=4, slots=1, views=1, dtype="float32", create=True)
    images = torch.randint(0, 255, (2, 1, 8, 8), dtype=torch.uint8)
    indices = torch.tensor([0, 3])
    first = outputs_of(2, fill=bad)
    got = cache.features(indices, images, 0, lambda: first, torch.device("cpu"))
    assert got is first
    assert cache.filled[:, 0].tolist() == [1, 0, 0, 0]  # image 3's row (batch row 1) held the bad value
    again = outputs_of(2)
    got = cache.features(indices, images, 0, lambda: again, torch.device("cpu"))
    assert got is again  # not every row was cached: computed again, and now stored
    assert cache.filled[:, 0].tolist() == [1, 0, 0, 1]


def test_the_key_holds_the_resolved_precision_and_the_load_size_of_folder_images(tmp_path):
    from distillkit.data.views import ViewConfig
    from distillkit.features import FeatureRequest
    from distillkit.teachers import load_teacher
    from distillkit.train.cache import cache_key

    teacher = load_teacher("efficientnet-lite0", None, 32)
    request = FeatureRequest(embedding=True)
    args = (teacher, request, ViewConfig(), (32, 32), 0, 1, 1, "float32", "")
    auto = cache_key(*args, device=torch.device("cpu"), load_size=None)
    assert auto["input"]["precision"] == "fp32"  # auto, resolved on this CPU
    teacher.precision = "fp32"
    assert cache_key(*args, device=torch.device("cpu"), load_size=None) == auto  # the same outputs, one entry
    assert cache_key(*args, device=torch.device("cpu"), load_size=40)["load_size"] == 40
    assert cache_key(*args, device=torch.device("cpu"), load_size=40) != cache_key(
        *args, device=torch.device("cpu"), load_size=48
    )


def test_two_runs_at_once_share_one_entry(tmp_path, teacher_calls):
    """Two processes create and fill the same entry at the same time (under the entry's lock): both finish,
    one entry exists, and a third run reads every view from it without running the teacher."""
    helper = Path(__file__).parent / "helpers" / "fault_run.py"
    cache = tmp_path / "cache"
    args = [
        "--student",
        "mobilenetv3-small",
        "--limit",
        "64",
        "--batch-size",
        "32",
        "--epochs",
        "1",
        "--teacher-cache",
        str(cache),
        "--quiet",
        "--set",
        "data.view_slots=1",
        *sum((["--set", s] for s in TINY), []),
    ]
    runs = [
        subprocess.Popen(
            [sys.executable, str(helper), "--", *args, "--out", str(tmp_path / f"run{i}")],
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    for process in runs:
        assert process.wait(timeout=300) == 0, process.stderr.read()[-3000:]
    (entry,) = cache.iterdir()
    assert np.fromfile(entry / "filled.bin", dtype=np.uint8).sum() == 64
    run(tmp_path / "reader", cache, epochs=1)  # the same recipe, in this process
    assert teacher_calls.count(32) == 0


@pytest.mark.parametrize("explicit", [False, True])
def test_a_disk_without_room_for_the_cache_skips_it_or_refuses_it(tmp_path, explicit):
    """A real fault: files of at most 40 MB may be written (RLIMIT_FSIZE, SIGXFSZ ignored: writes fail with
    EFBIG as on a full disk), and the entry's embedding array needs 82 MB. Its blocks are reserved before the
    first epoch, so the run learns it at once: the automatic cache is skipped with a message and training goes
    on; an explicit --teacher-cache is refused (exit 2). No half-made entry is left behind either way."""
    helper = Path(__file__).parent / "helpers" / "fault_run.py"
    cache = tmp_path / "cache"
    limited = (
        "import resource, signal, runpy, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (40 << 20, 40 << 20)); "
        f"sys.argv = [{str(helper)!r}] + sys.argv[1:]; runpy.run_path({str(helper)!r}, run_name='__main__')"
    )
    args = ["--student", "mobilenetv3-small", "--limit", "4000", "--batch-size", "32", "--epochs", "3"]
    args += ["--out", str(tmp_path / "run"), *sum((["--set", s] for s in TINY + ["data.view_slots=2"]), [])]
    env = {**os.environ, "DISTILLKIT_CACHE": str(cache)}
    if explicit:
        args += ["--teacher-cache", str(cache / "explicit")]
    else:  # the first step of the third epoch: the first run whose epochs (3) outnumber its view slots (2)
        args += ["--max-steps", str(2 * 4000 // 32 + 1)]
    done = subprocess.run(
        [sys.executable, "-c", limited, "--", *args], capture_output=True, text=True, env=env, timeout=300
    )
    message = " ".join(done.stderr.split()) + " ".join(done.stdout.split())
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "filled while reserving the cache" in message, message[-3000:]
    if explicit:
        assert done.returncode == 2 and "--no-teacher-cache" in message
    else:
        assert done.returncode == 0 and "teacher cache skipped" in message
    entries = [p for p in cache.rglob("meta.json")] if cache.exists() else []
    bins = [p for p in cache.rglob("*.bin")] if cache.exists() else []
    assert entries == [] and bins == []


def test_an_entrys_files_have_their_blocks_allocated_before_training(tmp_path):
    """Sparse files would take their blocks only as the first epoch writes them, and a disk that fills
    meanwhile kills the run with SIGBUS; the blocks of every array are reserved when the entry is made."""
    run(tmp_path / "run", tmp_path / "cache", epochs=1, max_steps=1)
    arrays = list((tmp_path / "cache").rglob("*.bin"))
    assert len(arrays) >= 3
    for path in arrays:
        assert os.stat(path).st_blocks * 512 >= path.stat().st_size > 0, path
