"""The teacher-output cache: a frozen teacher's features for a fixed set of views per image, on disk.

With `data.view_slots` K, epoch e renders the views of slot e mod K (their crop parameters are the hash
of (seed, slot, image index, view), see data/views.py), so every image has exactly K views per view
index, and a teacher's outputs for them can be computed once and replayed: the student sees exactly the
view the teacher saw, rendered again from the same parameters.

Layout (`--teacher-cache DIR`):

    DIR/<key hash>/meta.json          the key in full: teacher name, a hash of its weights, its input
                                      config and precision, the feature request, the view config, seed,
                                      K, views per step, storage dtype; and each stored tensor's shape
    DIR/<key hash>/<tensor>.bin       one memory-mapped array per feature tensor: (images, K, views, ...)
    DIR/<key hash>/filled.bin         uint8 (images, K): the slot was written
    DIR/<key hash>/image_hash.bin     int64 (images,): a hash of each image's pixels when it was written

Anything that changes the teacher's outputs (other weights, input size, request, views) changes the key,
so it opens another entry and a stale one is never read; students of the same teacher and views share
an entry. An image whose pixels differ from the ones its cached outputs came from is refused. A
meta.json that does not match its folder (a hash collision or a hand edit) is refused too.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from rich.markup import escape
from torch import Tensor
from torch.utils.data import Dataset

from ..data.decode import DECODING
from ..data.views import view_config, view_seed
from ..errors import RunError, UsageError
from ..features import FeatureRequest, Features
from ..io import cache_dir, disk_full, write_json
from ..recipe import DataConfig, Recipe
from .sync import agreed, main_decides

DTYPES = {"float16": (np.float16, torch.float16), "float32": (np.float32, torch.float32)}


def weights_hash(module: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes) of the whole network."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def image_hashes(images: Tensor) -> np.ndarray:
    """A 63-bit hash of each uint8 image's pixels and shape: (B,) int64, never 0 (0 = not written)."""
    out = np.empty(images.shape[0], dtype=np.int64)
    for i, image in enumerate(images.cpu()):
        digest = hashlib.blake2b(
            image.contiguous().numpy().tobytes(), digest_size=8, person=str(tuple(image.shape)).encode()[:16]
        ).digest()
        out[i] = (int.from_bytes(digest, "little") >> 1) or 1
    return out


class TeacherCache:
    """One teacher's outputs for `slots` x `views` views of `num_images` images, memory-mapped."""

    def __init__(
        self,
        root: Path,
        key: dict[str, Any],
        probe: Features,
        num_images: int,
        slots: int,
        views: int,
        dtype: str,
        create: bool,
    ):
        self.key = key
        self.slots, self.views = slots, views
        self.np_dtype, self.torch_dtype = DTYPES[dtype]
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        self.folder = Path(root) / digest
        # a probe is one image (batch 1): the per-image shape is the probe's without its batch dimension
        self.shapes = {
            name: tuple(t.shape[1:]) if not name.startswith("relations") else (t.shape[0],) + tuple(t.shape[2:])
            for name, t in probe.named().items()
        }
        self.prefix_tokens = probe.prefix_tokens
        meta = {
            "key": key,
            "num_images": num_images,
            "shapes": {k: list(v) for k, v in self.shapes.items()},
            "prefix_tokens": self.prefix_tokens,
        }
        with _entry_lock(self.folder):  # two runs creating one entry at once: one creates, the other opens it
            if create:
                self._create(meta)
            self._open(meta)

    def _create(self, meta: dict) -> None:
        """The entry's zero-filled arrays with every block reserved on the disk (`_reserve`), then meta.json.
        No room: the half-made entry is removed and `CacheNoRoom` raised."""
        path = self.folder / "meta.json"
        if path.exists():
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        n = meta["num_images"]
        arrays = {
            f"{name}.bin": (self.np_dtype, (n, self.slots, self.views, *shape)) for name, shape in self.shapes.items()
        }
        arrays |= {"filled.bin": (np.uint8, (n, self.slots)), "image_hash.bin": (np.int64, (n,))}
        try:
            for name, (dtype, shape) in arrays.items():
                _reserve(self.folder / name, int(np.prod(shape)) * np.dtype(dtype).itemsize)
            write_json(path, meta)  # last: an entry without meta.json is incomplete and gets rebuilt
        except (OSError, RunError) as e:
            shutil.rmtree(self.folder, ignore_errors=True)
            if isinstance(e, RunError) or disk_full(e):
                raise CacheNoRoom(
                    f"the disk under {self.folder.parent} filled while reserving the cache ({e})"
                ) from None
            raise

    def _open(self, meta: dict) -> None:
        try:
            stored = json.loads((self.folder / "meta.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise UsageError(f"teacher cache {self.folder} is unreadable ({e}); delete that folder") from None
        if stored != json.loads(json.dumps(meta)):
            different = sorted(
                k
                for k in set(stored.get("key", {})) | set(meta["key"])
                if stored.get("key", {}).get(k) != meta["key"].get(k)
            )
            raise UsageError(
                f"teacher cache {self.folder} does not match this run (different: "
                f"{', '.join(different) or 'stored shapes'}); delete that folder or use another "
                "--teacher-cache"
            )
        n = meta["num_images"]
        self.arrays = {
            name: self._map(f"{name}.bin", self.np_dtype, (n, self.slots, self.views, *shape))
            for name, shape in self.shapes.items()
        }
        self.filled = self._map("filled.bin", np.uint8, (n, self.slots))
        self.image_hash = self._map("image_hash.bin", np.int64, (n,))

    def _map(self, name: str, dtype, shape: tuple[int, ...]) -> np.memmap:
        """One of the entry's arrays; a missing or truncated file is a damaged entry, named."""
        path = self.folder / name
        expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
        try:
            size = path.stat().st_size
            if size != expected:
                raise ValueError(f"{size} bytes instead of {expected}")
            return np.memmap(path, dtype=dtype, mode="r+", shape=shape)
        except (OSError, ValueError) as e:
            raise UsageError(
                f"teacher cache entry {self.folder} is damaged ({name}: {getattr(e, 'strerror', None) or e}); "
                f"delete that folder (rm -r {self.folder}) and run again: it is rebuilt"
            ) from None

    def filled_fraction(self) -> float:
        return float(self.filled.mean())

    def features(
        self, indices: Tensor, images: Tensor, slot: int, compute: Callable[[], list[Features]], device: torch.device
    ) -> list[Features]:
        """The teacher's Features of each view of this batch: read when every row is cached, else computed
        by `compute()` and written. Images whose pixels changed since they were written are refused."""
        rows = indices.cpu().numpy()
        hashes = image_hashes(images)
        stored = self.image_hash[rows]
        changed = (stored != 0) & (stored != hashes)
        if changed.any():
            raise UsageError(
                f"teacher cache {self.folder}: image {int(rows[changed.argmax()])} is not the image its "
                "cached teacher outputs came from (the data changed); delete that folder or use "
                "another --teacher-cache"
            )
        if self.filled[rows, slot].all():
            return [
                Features.from_named(
                    {name: self._read(name, array, rows, slot, v, device) for name, array in self.arrays.items()},
                    self.prefix_tokens,
                )
                for v in range(self.views)
            ]
        computed = compute()
        if len(computed) != self.views:
            raise RuntimeError(f"teacher cache expects {self.views} views per step, got {len(computed)}")
        per_row = [
            [t.transpose(0, 1) if name.startswith("relations") else t for name, t in features.named().items()]
            for features in computed  # relations (2, B, ...) -> (B, 2, ...): rows first, as stored
        ]
        finite = torch.ones(len(rows), dtype=torch.bool)
        for tensors in per_row:
            for tensor in tensors:
                finite &= torch.isfinite(tensor.detach()).flatten(1).all(1).cpu()
        keep = finite.numpy()  # a row with a NaN / inf output is used as computed but never stored
        for v, features in enumerate(computed):
            for (name, _), tensor in zip(features.named().items(), per_row[v]):
                values = tensor.detach().float().cpu().numpy().astype(self.np_dtype)
                self.arrays[name][rows[keep], slot, v] = values[keep]
        self.image_hash[rows[keep]] = hashes[keep]
        self.filled[rows[keep], slot] = 1
        return computed

    @staticmethod
    def _read(name: str, array: np.memmap, rows: np.ndarray, slot: int, view: int, device) -> Tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(array[rows, slot, view])).to(device=device, dtype=torch.float32)
        return tensor.transpose(0, 1) if name.startswith("relations") else tensor  # (B, 2, ...) -> (2, B, ...)

    def flush(self) -> None:
        for array in (*self.arrays.values(), self.filled, self.image_hash):
            array.flush()


class CacheNoRoom(Exception):
    """The disk (or a file-size / quota limit) had no room for a new cache entry's files."""


def _reserve(path: Path, size: int) -> None:
    """A zero-filled file of `size` bytes whose blocks are allocated now (posix_fallocate), so a disk that
    fills later cannot fail the memory-mapped writes of the first epoch (a SIGBUS that would kill the run
    without a checkpoint). Where the OS has no posix_fallocate the file is sparse, as np.memmap makes it."""
    with open(path, "wb") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, size) if size else None
        except (AttributeError, OSError) as e:
            if isinstance(e, OSError) and e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            f.truncate(size)


@contextmanager
def _entry_lock(folder: Path):
    """An exclusive lock on the entry's `.lock` file (fcntl, released when the process dies), around creating
    and opening the entry, so two runs starting on one entry never both create its files."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cache_key(
    teacher,
    request: FeatureRequest,
    view_config,
    render_size: tuple[int, int],
    seed: int,
    slots: int,
    views: int,
    dtype: str,
    expand: str,
    *,
    device: torch.device,
    load_size: int | None,
) -> dict[str, Any]:
    """Everything the cached outputs depend on: the teacher (weights, input, precision as it runs on `device`),
    the request, the views, and `load_size`, the size folder images are loaded at (None for in-memory data)."""
    return {
        "teacher": teacher.name,
        "weights_sha256": weights_hash(teacher.full_model)
        + (weights_hash(teacher.projection_head) if teacher.projection_head is not None else ""),
        "input": {
            "size": list(teacher.input_config.size),
            "mean": list(teacher.input_config.mean),
            "std": list(teacher.input_config.std),
            "channels_last": teacher.channels_last,
            "precision": teacher.resolved_precision(device),
        },
        "request": {
            f.name: list(v) if isinstance(v := getattr(request, f.name), tuple) else v for f in fields(request)
        },
        "views": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(view_config).items()}
        | {"size": list(render_size)},
        "seed": seed,
        "slots": slots,
        "views_per_step": views,
        "expand_views": expand,
        "dtype": dtype,
        "load_size": load_size,
        "decoding": DECODING if load_size is not None else None,  # file-backed data: how files become pixels
    }


def teacher_cache_root(data: DataConfig, epochs: int, slots: int | None) -> Path | None:
    """Where the teachers' outputs are cached, or None. `data.teacher_cache` "auto" caches in the user cache
    exactly when it pays: the run has a fixed set of views (`data.view_slots`) and more epochs than slots,
    so every epoch after the first `slots` reads the teacher's outputs instead of recomputing them."""
    setting = data.teacher_cache
    if setting is None:
        return None
    if setting == "auto":
        return cache_dir() / "teacher-outputs" if slots is not None and epochs > slots else None
    return Path(setting).expanduser()


@dataclass
class CacheSetup:
    """What a run's teacher caches are opened for: the teachers and what the strategies read from them, the
    objective (its views), where each teacher's views are rendered, the training images and the view slots."""

    teachers: dict[str, Any]  # role -> Teacher
    requests: dict[str, FeatureRequest]
    objective: Any  # the Objective: its num_views and derived views change what is stored
    sizes: dict[str, tuple[int, int]]  # role -> render size
    train_set: Dataset
    slots: int | None  # None: new views every epoch, nothing to cache
    load_size: int | None = None  # the size folder images load at (they are hashed at it); None: in-memory data


def open_caches(
    recipe: Recipe, accelerator, setup: CacheSetup, epochs: int, say: Callable[[str], None]
) -> tuple[dict[str, TeacherCache], Path | None]:
    """One cache entry per teacher role, created by the main process, announced by `say`, and where they
    are (None: no cache). When the disk lacks the room for what the run would write, an automatic cache
    ("auto") keeps the roles that fit (the smallest per image first) and recomputes the others every epoch,
    with a message; an explicit folder is refused."""
    root = teacher_cache_root(recipe.data, epochs, setup.slots) if setup.requests and setup.slots else None
    if root is None:
        return {}, None
    main = accelerator.is_main_process
    roles = _roles_that_fit(recipe, accelerator, setup, root, min(setup.slots, epochs), say) if main else []
    roles = main_decides(accelerator, roles)  # every process learns the main process's decision
    if not roles:
        return {}, None
    caches = _create_entries(recipe, accelerator, setup, root, roles, say) if main else {}
    if agreed(accelerator, main and not caches):  # the disk filled while the main process reserved the files
        return {}, None
    return (caches if main else _open_entries(recipe, accelerator, setup, root, roles, create=False)), root


def _create_entries(
    recipe: Recipe, accelerator, setup: CacheSetup, root: Path, roles: list[str], say
) -> dict[str, TeacherCache]:
    """The main process creates (or opens) the entries of `roles`; a disk that fills while their blocks are
    reserved skips an automatic cache with a message and refuses an explicit folder."""
    try:
        return _open_entries(recipe, accelerator, setup, root, roles, create=True)
    except CacheNoRoom as e:
        if recipe.data.teacher_cache != "auto":
            raise UsageError(
                f"--teacher-cache: {e}; free space, choose another folder or pass --no-teacher-cache"
            ) from None
        say(f"[yellow]teacher cache skipped: {escape(str(e))}; the teacher runs every epoch[/]")
        return {}


def _open_entries(
    recipe: Recipe, accelerator, setup: CacheSetup, root: Path, roles: list[str], create: bool
) -> dict[str, TeacherCache]:
    # the strategies that derive views (kdss' rotations) change what is cached; the others do not, so
    # students trained with seed and with feature share the teacher's embeddings
    # entries are keyed by what the teacher computes, not by the role's name: a teacher cached under one role is
    # read under another, and two roles asking one teacher the same share one entry (one fills, both read)
    objective = setup.objective
    expand = "+".join(type(s).__name__ for s in objective.strategies.values() if type(s).derives_views())
    caches, by_key = {}, {}
    for role in roles:
        request, teacher, size = setup.requests[role], setup.teachers[role], setup.sizes[role]
        views = objective.expand_views([torch.zeros(1, 3, *size) for _ in range(objective.num_views)])
        probe = teacher(views[0].to(accelerator.device), request)
        key = cache_key(
            teacher,
            request,
            view_config(recipe.data),
            size,
            view_seed(recipe.data, recipe.train.seed),
            setup.slots,
            len(views),
            recipe.data.cache_dtype,
            expand,
            device=accelerator.device,
            load_size=setup.load_size,
        )
        same = json.dumps(key, sort_keys=True)
        if same in by_key:
            caches[role] = by_key[same]
            continue
        caches[role] = by_key[same] = TeacherCache(
            root,
            key,
            probe,
            index_space(setup.train_set),
            setup.slots,
            len(views),
            recipe.data.cache_dtype,
            create=create,
        )
    return caches


def _roles_that_fit(
    recipe: Recipe, accelerator, setup: CacheSetup, root: Path, slots_used: int, say: Callable[[str], None]
) -> list[str]:
    """The teacher roles whose outputs the disk under `root` has room for (`slots_used` slots of every image,
    with a 5 % + 256 MB margin): every role, or for an automatic cache the most roles that fit, the smallest
    per image first ([] when none does); an explicit folder without room for all of them is refused."""
    objective = setup.objective
    views_per_step = len(objective.expand_views([torch.zeros(1, 3, 1, 1) for _ in range(objective.num_views)]))
    per_image = {
        role: _cache_bytes(
            setup.teachers[role],
            request,
            views_per_step,
            setup.sizes[role],
            recipe.data.cache_dtype,
            accelerator.device,
        )
        for role, request in setup.requests.items()
    }
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free

    def needed(roles) -> int:
        return sum(per_image[role] for role in roles) * len(setup.train_set) * slots_used

    def fits(roles) -> bool:
        return needed(roles) * 1.05 + (256 << 20) <= free

    def where(roles) -> str:
        each = ", ".join(f"{role} {_size(per_image[role])}" for role in roles)
        return (
            f"{escape(str(root))} ({_gb(needed(roles))} for {len(setup.train_set):,} images x {slots_used} view "
            f"slot{'s' if slots_used != 1 else ''}; per image and slot: {escape(each)})"
        )

    everyone = list(per_image)
    reads = f"{_after_first(slots_used)} the teachers' outputs instead of running them"
    if fits(everyone):
        say(f"teacher cache: {where(everyone)}; {reads} (--no-teacher-cache to turn it off)")
        return everyone
    if recipe.data.teacher_cache != "auto":
        raise UsageError(
            f"--teacher-cache {where(everyone)} needs more than the {_gb(free)} free there; free space, choose "
            "another folder or pass --no-teacher-cache"
        )
    kept: list[str] = []
    for role in sorted(everyone, key=per_image.get):
        if fits([*kept, role]):
            kept.append(role)
    room = "free space, or set data.teacher_cache to a folder with room"
    if not kept:
        say(
            f"[yellow]teacher cache skipped: {where(everyone)} needs more than the {_gb(free)} free there; the "
            f"teacher runs every epoch ({room})[/]"
        )
        return []
    recomputed = ", ".join(role for role in everyone if role not in kept)
    say(
        f"[yellow]teacher cache: only {', '.join(kept)} fit{'s' if len(kept) == 1 else ''} in the {_gb(free)} "
        f"free (5 % + 256 MB stay free): {where(kept)}; {reads}. Not cached, run every epoch: "
        f"{escape(recomputed)} (all of them would need {_gb(needed(everyone))}; {room})[/]"
    )
    return [role for role in everyone if role in kept]  # in the recipe's order


def _cache_bytes(teacher, request: FeatureRequest, views: int, size: tuple[int, int], dtype: str, device) -> int:
    """Bytes one image's cached outputs take for one view slot: every stored tensor, every view."""
    probe = teacher(torch.zeros(1, 3, *size, device=device), request)
    itemsize = 2 if dtype == "float16" else 4
    return views * itemsize * sum(t.numel() for t in probe.named().values())  # the probe is one image


def _size(size: float) -> str:
    """A per-image size: kB below a megabyte."""
    return f"{size / 1e3:.1f} kB" if size < 1e6 else _gb(size)


def _gb(size: float) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"


def index_space(dataset: Dataset) -> int:
    """How many image indices the dataset's items can carry (a Subset keeps its base's indices)."""
    base = getattr(dataset, "base", None)
    return index_space(base) if base is not None else len(dataset)


def _after_first(epochs: int) -> str:
    """Which epochs read the cache, in words: "every epoch after the first reads" / "epochs after the first 3 read"."""
    return "every epoch after the first reads" if epochs == 1 else f"epochs after the first {epochs} read"
