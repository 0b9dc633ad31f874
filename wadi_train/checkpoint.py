"""Atomic, verifiable training checkpoints with bit-exact resume (DESIGN §5).

A checkpoint is a folder `run_dir/checkpoints/step-000123/` holding one safetensors file per
tensor group (`student.safetensors`, `fake.safetensors`, `ema.safetensors`...), the optimizer
and scheduler state dicts (`optimizers.pt`, `schedulers.pt`), the RNG states (`rng.pt`) and
`state.json` (step, extra, config, and the size and sha256 of every file). It is written into a
`.tmp-*` folder, fsynced, renamed into place and then published by atomically replacing the
small text file `checkpoints/latest`, so a crash at any point leaves `latest` naming a complete
checkpoint. A lock file (`checkpoints/.lock`, flock where the OS has it) serialises savers and
the clean-up that `latest_checkpoint` does. The module is generic: it takes dicts of tensors and
state dicts and never imports model code.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import mmap
import os
import random
import re
import secrets
import shutil
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from wadi_train.errors import WadiError

try:  # POSIX only; elsewhere saves are not serialised against a concurrent latest_checkpoint
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "FORMAT_VERSION",
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointSaveError",
    "LoadedCheckpoint",
    "capture_rng",
    "checkpoint_name",
    "is_complete",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "restore_rng",
    "save_checkpoint",
]

log = logging.getLogger(__name__)

FORMAT = "wadi_train.checkpoint"
FORMAT_VERSION = 1
CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
STATE_FILE = "state.json"
LOCK_FILE = ".lock"
_TMP = ".tmp-"  # unfinished writes, prune trash, `latest` temp files: always safe to delete
_OLD = ".old-"  # a step folder set aside while the same step is saved again
_STEP_RE = re.compile(r"^step-(\d+)$")
_GROUP_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_CHUNK = 1 << 20


class CheckpointError(WadiError):
    """A training checkpoint could not be read, or does not fit the live objects."""


class CheckpointCorruptError(CheckpointError):
    """A checkpoint file is missing, truncated or does not match its recorded sha256."""


class CheckpointSaveError(CheckpointError):
    """A checkpoint could not be written (disk full, permissions...); the previous one is intact."""


@dataclass(frozen=True)
class LoadedCheckpoint:
    """Everything `save_checkpoint` wrote, read back and verified.

    Attributes:
        path: the step folder it was read from.
        step: the training step it was saved at.
        tensors: tensor group -> name -> tensor, keys exactly as saved.
        optimizers: name -> optimizer state dict.
        schedulers: name -> scheduler state dict.
        rng: what `capture_rng` returned, or None when no RNG state was saved.
        extra: the JSON-able extra dict (empty when none was given).
        config: the JSON-able run config, or None.
    """

    path: Path
    step: int
    tensors: dict[str, dict[str, Tensor]]
    optimizers: dict[str, Any]
    schedulers: dict[str, Any]
    rng: dict[str, Any] | None
    extra: dict[str, Any]
    config: dict[str, Any] | None


def checkpoint_name(step: int) -> str:
    """The folder name of a step's checkpoint: `step-000123` (more digits past 999999)."""
    return f"step-{step:06d}"


# -- RNG ------------------------------------------------------------------------------------
def capture_rng(generators: Mapping[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Capture every RNG a training step may draw from, in a `weights_only`-loadable form.

    Args:
        generators: named `torch.Generator`s (e.g. the data sampler's) to capture as well.

    Returns:
        A dict with Python's `random`, NumPy's global generator, torch's CPU generator, every
        CUDA device's generator (when CUDA is available) and the named generators.
    """
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": random.getstate(),
        # NumPy arrays are refused by torch.load(weights_only=True): store the key as a tensor.
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "generators": {name: g.get_state() for name, g in (generators or {}).items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(
    state: Mapping[str, Any], generators: Mapping[str, torch.Generator] | None = None
) -> None:
    """Put back the RNG states that `capture_rng` returned.

    Args:
        state: a `capture_rng` result (e.g. `LoadedCheckpoint.rng`).
        generators: named generators to restore; each must have a saved state.

    Raises:
        CheckpointError: no RNG state was saved, or a named generator has none.
    """
    if state is None:
        raise CheckpointError(
            "this checkpoint holds no RNG state (it was saved with rng=None); resume cannot be bit-exact"
        )
    saved = state.get("generators", {})
    missing = sorted(set(generators or {}) - set(saved))
    if missing:
        raise CheckpointError(
            f"no saved RNG state for generator(s) {missing}; the checkpoint has {sorted(saved)}. Pass the same names to capture_rng and restore_rng"
        )
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": n["bit_generator"],
            "state": {"key": n["key"].numpy().astype(np.uint32), "pos": int(n["pos"])},
            "has_gauss": int(n["has_gauss"]),
            "gauss": float(n["gauss"]),
        }
    )
    torch.set_rng_state(state["torch"].cpu())
    _restore_cuda_rng(state.get("cuda"))
    for name, g in (generators or {}).items():
        g.set_state(saved[name].cpu())


def _restore_cuda_rng(cuda_states: list[Tensor] | None) -> None:
    if cuda_states is None:
        return
    if not torch.cuda.is_available():
        log.warning(
            "the checkpoint holds CUDA RNG states but CUDA is not available; they are not restored"
        )
        return
    count = torch.cuda.device_count()
    if count != len(cuda_states):
        log.warning(
            "the checkpoint holds %d CUDA RNG states but %d devices are visible; restoring the first %d",
            len(cuda_states),
            count,
            min(count, len(cuda_states)),
        )
    for i, s in enumerate(cuda_states[:count]):
        torch.cuda.set_rng_state(s.cpu(), i)


# -- save -----------------------------------------------------------------------------------
def save_checkpoint(
    run_dir: str | os.PathLike[str],
    step: int,
    *,
    tensors: Mapping[str, Mapping[str, Tensor]],
    optimizers: Mapping[str, Any] | None = None,
    schedulers: Mapping[str, Any] | None = None,
    rng: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
    keep: int | None = 3,
) -> Path:
    """Write a checkpoint atomically and publish it as `latest`; prune older ones.

    Args:
        run_dir: the run folder; checkpoints go to `run_dir/checkpoints/step-XXXXXX/`.
        step: the training step (>= 0). Saving a step that exists replaces it safely.
        tensors: group -> name -> tensor; each group becomes `<group>.safetensors`.
        optimizers: name -> optimizer state dict (saved with torch.save as `optimizers.pt`).
        schedulers: name -> scheduler state dict (`schedulers.pt`).
        rng: a `capture_rng()` result (`rng.pt`), or None for none.
        extra: small JSON-able values (counters, provenance); JSON turns tuples into lists.
        config: the resolved run config as a JSON-able dict.
        keep: how many checkpoints to keep, counting this one; older steps (lower numbers)
            beyond that are deleted. Higher steps (an abandoned branch) are left alone.
            None keeps everything.

    Returns:
        The step folder.

    Raises:
        CheckpointSaveError: the disk refused (full, read-only...), or a value cannot be saved
            in a form that loads back safely. The previous checkpoint and `latest` are intact.
    """
    _check_save_args(step, tensors, keep)
    payloads: dict[str, Any] = {
        "optimizers.pt": dict(optimizers or {}),
        "schedulers.pt": dict(schedulers or {}),
    }
    if rng is not None:
        payloads["rng.pt"] = dict(rng)
    for fname, obj in payloads.items():
        _check_weights_only(obj, fname.removesuffix(".pt"))
    meta = _json_meta(step, tensors, rng is not None, extra, config)
    ckpt_dir = Path(run_dir) / CHECKPOINTS_DIR
    final = ckpt_dir / checkpoint_name(step)
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        with _locked(ckpt_dir):
            # os.mkdir, not mkdtemp: the folder keeps the umask's mode, not 0o700
            tmp = ckpt_dir / f"{_TMP}{final.name}-{secrets.token_hex(4)}"
            os.mkdir(tmp)
            try:
                _write_folder(tmp, tensors, payloads, meta)
                _publish(tmp, final)
            except BaseException:
                _discard(tmp)
                raise
            _prune(ckpt_dir, final, keep)
    except OSError as e:
        detail = " ".join(str(e).split())
        raise CheckpointSaveError(
            f"could not save checkpoint step {step} to {final}: {detail}; the previous checkpoint is intact, free space or fix permissions and save again"
        ) from e
    log.info("saved checkpoint %s", final)
    return final


def _check_save_args(
    step: int, tensors: Mapping[str, Mapping[str, Tensor]], keep: int | None
) -> None:
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    if keep is not None and keep < 1:
        raise ValueError(f"keep must be >= 1 (or None to keep every checkpoint), got {keep}")
    for group, named in tensors.items():
        if not _GROUP_RE.match(group):
            raise ValueError(
                f"tensor group name {group!r} must be a plain file stem (letters, digits, '_', '-', '.')"
            )
        for key, t in named.items():
            if not isinstance(t, Tensor):
                raise TypeError(
                    f"tensors[{group!r}][{key!r}] is a {type(t).__name__}, expected a torch.Tensor"
                )


# Types torch.load(weights_only=True) accepts (checked against torch 2.13): exact types only,
# since subclasses (defaultdict, namedtuple, numpy scalars) are refused at load time.
_SAFE_LEAVES = (
    bool,
    int,
    float,
    complex,
    str,
    bytes,
    type(None),
    torch.dtype,
    torch.device,
    torch.Size,
    Tensor,
    torch.nn.Parameter,
)
_SAFE_CONTAINERS = (dict, OrderedDict, list, tuple, set)


def _check_weights_only(obj: Any, where: str) -> None:
    """Refuse before writing what `torch.load(weights_only=True)` would refuse when resuming."""
    kind = type(obj)
    if kind in _SAFE_LEAVES:
        return
    if kind in (dict, OrderedDict):
        for k, v in obj.items():
            _check_weights_only(k, f"{where} key")
            _check_weights_only(v, f"{where}[{k!r}]")
        return
    if kind in _SAFE_CONTAINERS:
        for i, v in enumerate(obj):
            _check_weights_only(v, f"{where}[{i}]")
        return
    raise CheckpointSaveError(
        f"cannot save {where}: it is a {kind.__module__}.{kind.__qualname__}, which torch.load(weights_only=True) refuses on resume; keep state dicts to tensors, numbers, strings, lists and dicts (e.g. make a LambdaLR lambda a plain function or a closure)"
    )


def _json_meta(
    step: int,
    tensors: Mapping[str, Mapping[str, Tensor]],
    has_rng: bool,
    extra: Mapping[str, Any] | None,
    config: Mapping[str, Any] | None,
) -> dict[str, Any]:
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "step": step,
        "tensor_groups": sorted(tensors),
        "has_rng": has_rng,
        "torch_version": torch.__version__,
        "extra": dict(extra or {}),
        "config": None if config is None else dict(config),
    }
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as e:
        raise CheckpointSaveError(
            f"cannot save checkpoint step {step}: extra and config must be JSON-serialisable ({e}); convert dataclasses with dataclasses.asdict and paths with str"
        ) from e
    return meta


@contextmanager
def _locked(ckpt_dir: Path) -> Iterator[bool | None]:
    """Hold the folder's exclusive lock while inside.

    Yields True when held, None where the OS or filesystem has no locks (go ahead unlocked),
    False when the lock file cannot be opened (a read-only folder).
    """
    try:
        fd = os.open(ckpt_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        yield False
        return
    try:
        held: bool | None = None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                held = True
            except OSError as e:  # e.g. a filesystem without locks
                log.debug("cannot lock %s (%s); continuing without a lock", ckpt_dir, e)
        yield held
    finally:
        os.close(fd)  # closing releases the flock


def _write_folder(
    tmp: Path,
    tensors: Mapping[str, Mapping[str, Tensor]],
    payloads: dict[str, Any],
    meta: dict[str, Any],
) -> None:
    files: dict[str, dict[str, Any]] = {}
    for group, named in tensors.items():
        path = tmp / f"{group}.safetensors"
        save_file(
            {k: t.detach().contiguous() for k, t in named.items()},
            str(path),
            metadata={"format": "pt", "step": str(meta["step"])},
        )
        files[path.name] = _seal(path)
    for fname, obj in payloads.items():
        with open(tmp / fname, "wb") as fh:
            torch.save(obj, fh)
        files[fname] = _seal(tmp / fname)
    _write_text(tmp / STATE_FILE, json.dumps({**meta, "files": files}, indent=2) + "\n")
    _fsync_dir(tmp)


def _seal(path: Path) -> dict[str, Any]:
    """fsync a written file and return its size and sha256 (read back from the page cache)."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "r+b") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
        os.fsync(fh.fileno())
    return {"bytes": size, "sha256": digest.hexdigest()}


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    """Make renames inside `path` durable (POSIX); a no-op where directories cannot be fsynced."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished folder into place, then point `latest` at it; undo on failure."""
    ckpt_dir = final.parent
    aside = None
    if final.exists():  # saving the same step again: set the old folder aside first
        aside = ckpt_dir / f"{_OLD}{final.name}-{secrets.token_hex(4)}"
        os.rename(final, aside)
    try:
        os.rename(tmp, final)
    except BaseException:
        if aside is not None:
            _best_effort(os.rename, aside, final)
        raise
    try:
        _fsync_dir(ckpt_dir)
        _write_latest(ckpt_dir, final.name)
    except BaseException:
        _best_effort(os.rename, final, tmp)  # the caller discards tmp
        if aside is not None:
            _best_effort(os.rename, aside, final)
        raise
    if aside is not None:
        _discard(aside)


def _write_latest(ckpt_dir: Path, name: str) -> None:
    tmp = ckpt_dir / f"{_TMP}{LATEST_FILE}-{secrets.token_hex(4)}"
    try:
        _write_text(tmp, name + "\n")
        os.replace(tmp, ckpt_dir / LATEST_FILE)
    except BaseException:
        _best_effort(os.unlink, tmp)
        raise
    _fsync_dir(ckpt_dir)


def _prune(ckpt_dir: Path, just_written: Path, keep: int | None) -> None:
    """Delete older step folders beyond `keep`; never the new one, never higher steps."""
    if keep is None:
        return
    new_step = _step_of(just_written)
    older = [p for p in _step_folders(ckpt_dir) if _step_of(p) < new_step]
    for p in older[: max(len(older) - (keep - 1), 0)]:
        # Rename first so that a crash mid-delete leaves a `.tmp-` folder, never a partial step.
        trash = ckpt_dir / f"{_TMP}trash-{p.name}-{secrets.token_hex(4)}"
        try:
            os.rename(p, trash)
        except OSError as e:
            log.warning("could not prune old checkpoint %s: %s", p, e)
            continue
        _discard(trash)


def _discard(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        _best_effort(os.unlink, path)
    if os.path.lexists(path):
        log.warning("could not delete %s; delete it by hand", path)


def _best_effort(fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except OSError as e:
        log.warning("%s%s failed during roll-back: %s", fn.__name__, args, e)


# -- find -----------------------------------------------------------------------------------
def _step_of(path: Path) -> int:
    m = _STEP_RE.match(path.name)
    assert m is not None, f"not a step folder: {path}"
    return int(m.group(1))


def _step_folders(ckpt_dir: Path) -> list[Path]:
    """Step folders sorted by step (numerically, so step-1000000 follows step-999999)."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if _STEP_RE.match(p.name) and p.is_dir()]
    return sorted(found, key=_step_of)


def _read_state(folder: Path) -> dict[str, Any]:
    with open(folder / STATE_FILE, encoding="utf-8") as fh:
        state = json.load(fh)
    if (
        not isinstance(state, dict)
        or state.get("format") != FORMAT
        or not isinstance(state.get("files"), dict)
    ):
        raise ValueError(f"{folder / STATE_FILE} is not a {FORMAT} state file")
    return state


def is_complete(folder: str | os.PathLike[str]) -> bool:
    """Cheap check: `state.json` reads and every file it lists exists with the recorded size."""
    folder = Path(folder)
    try:
        state = _read_state(folder)
        return all(
            (folder / name).stat().st_size == rec["bytes"] for name, rec in state["files"].items()
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[Path]:
    """The run's complete step folders, oldest step first (no clean-up, no locking)."""
    return [p for p in _step_folders(Path(run_dir) / CHECKPOINTS_DIR) if is_complete(p)]


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The checkpoint to resume from, or None when the run has none.

    Reads `checkpoints/latest`; if it is missing or names an incomplete folder, falls back to
    the highest complete `step-*` folder (with a warning). First it cleans up what a crashed
    save left behind: `.tmp-*` leftovers are deleted and a step folder that was set aside
    while being saved again is put back. It waits for a save in progress (the folder lock).

    Args:
        run_dir: the run folder (holding `checkpoints/`).
    """
    ckpt_dir = Path(run_dir) / CHECKPOINTS_DIR
    if not ckpt_dir.is_dir():
        return None
    with _locked(ckpt_dir) as held:
        if held is not False:  # a read-only folder is only read
            try:
                _recover(ckpt_dir)
            except OSError as e:
                log.warning("could not clean up %s: %s", ckpt_dir, e)
        named = _read_latest(ckpt_dir)
        if named is not None and is_complete(named):
            return named
        complete = [p for p in _step_folders(ckpt_dir) if is_complete(p)]
        if not complete:
            return None
        if named is not None or (ckpt_dir / LATEST_FILE).exists():
            log.warning(
                "%s does not name a complete checkpoint; using %s",
                ckpt_dir / LATEST_FILE,
                complete[-1],
            )
        return complete[-1]


def _read_latest(ckpt_dir: Path) -> Path | None:
    try:
        name = (ckpt_dir / LATEST_FILE).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return ckpt_dir / name if _STEP_RE.match(name) else None


def _recover(ckpt_dir: Path) -> None:
    """Undo what a killed save left: delete `.tmp-*`, put back or delete `.old-*` folders."""
    for p in sorted(ckpt_dir.iterdir()):
        if p.name.startswith(_TMP):
            log.info("removing leftover %s of an interrupted save", p)
            _discard(p)
        elif p.name.startswith(_OLD):
            original = ckpt_dir / p.name[len(_OLD) :].rsplit("-", 1)[0]
            if _STEP_RE.match(original.name) and not original.exists() and is_complete(p):
                log.warning("restoring %s, set aside by an interrupted save", original)
                os.rename(p, original)
            else:
                _discard(p)


# -- load -----------------------------------------------------------------------------------
def load_checkpoint(
    path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu", verify: bool = True
) -> LoadedCheckpoint:
    """Read a step folder back, checking every file against `state.json` first.

    Args:
        path: a step folder (e.g. from `latest_checkpoint`).
        map_location: device for the tensors and optimizer/scheduler state (RNG stays on CPU).
        verify: check sizes and sha256 (reads every file once more); sizes are always checked.

    Raises:
        CheckpointCorruptError: `state.json` is unreadable, or a file is missing, has the wrong
            size or the wrong sha256. The message names the file and the checkpoint to use.
        CheckpointError: the folder was written by a newer, incompatible format version.
    """
    folder = Path(path)
    if not (folder / STATE_FILE).exists():
        raise CheckpointError(
            f"{folder} is not a checkpoint folder (no {STATE_FILE}); pass a step-* folder, e.g. latest_checkpoint(run_dir)"
        )
    try:
        state = _read_state(folder)
    except (OSError, ValueError) as e:
        raise CheckpointCorruptError(
            f"{folder / STATE_FILE} is unreadable ({e}); {_fallback_hint(folder)}"
        ) from e
    if int(state.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(
            f"{folder} has checkpoint format {state['format_version']}, this wadi_train reads up to {FORMAT_VERSION}; upgrade wadi_train"
        )
    for name, rec in state["files"].items():
        _verify_file(folder, name, rec, verify)
    files = state["files"]
    tensors = {
        g: _load_safetensors(folder / f"{g}.safetensors", map_location)
        for g in state["tensor_groups"]
    }
    return LoadedCheckpoint(
        path=folder,
        step=int(state["step"]),
        tensors=tensors,
        optimizers=_load_pt(folder / "optimizers.pt", map_location),
        schedulers=_load_pt(folder / "schedulers.pt", map_location),
        rng=_load_pt(folder / "rng.pt", "cpu") if "rng.pt" in files else None,
        extra=state.get("extra") or {},
        config=state.get("config"),
    )


def _verify_file(folder: Path, name: str, rec: dict[str, Any], check_hash: bool) -> None:
    path = folder / name
    try:
        size = path.stat().st_size
    except OSError as e:
        raise CheckpointCorruptError(
            f"checkpoint file {path} is missing ({e.strerror}); {_fallback_hint(folder)}"
        ) from e
    if size != rec["bytes"]:
        raise CheckpointCorruptError(
            f"checkpoint file {path} has {size} bytes, state.json records {rec['bytes']}; {_fallback_hint(folder)}"
        )
    if check_hash:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                digest.update(chunk)
        if digest.hexdigest() != rec["sha256"]:
            raise CheckpointCorruptError(
                f"checkpoint file {path} fails its sha256 check (found {digest.hexdigest()[:12]}..., state.json records {rec['sha256'][:12]}...); {_fallback_hint(folder)}"
            )


def _fallback_hint(folder: Path) -> str:
    """Name the newest other complete checkpoint of the same run, for the error message."""
    m = _STEP_RE.match(folder.name)
    try:
        earlier = [
            p
            for p in _step_folders(folder.parent)
            if m and _step_of(p) < int(m.group(1)) and is_complete(p)
        ]
    except OSError:
        earlier = []
    if earlier:
        return (
            f"the checkpoint cannot be trusted: resume from the previous checkpoint {earlier[-1]}"
        )
    return "the checkpoint cannot be trusted and no earlier checkpoint exists: restart the run"


def _load_safetensors(path: Path, device: str | torch.device) -> dict[str, Tensor]:
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        names = f.keys()
        return {k: f.get_tensor(k) for k in names}


def _load_pt(path: Path, map_location: str | torch.device) -> Any:
    # weights_only refuses anything but plain data. mmap streams large optimizer states, but
    # only through a private (copy-on-write) mapping: with MAP_SHARED the optimizer's in-place
    # updates would write into the checkpoint file.
    private = getattr(torch.serialization, "set_default_mmap_options", None)
    if os.name != "posix" or private is None:
        return torch.load(path, map_location=map_location, weights_only=True)
    with private(mmap.MAP_PRIVATE):
        return torch.load(path, map_location=map_location, weights_only=True, mmap=True)
