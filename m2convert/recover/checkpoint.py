"""Recovery checkpoints: safetensors for tensors, JSON for everything else; nothing is unpickled.

A checkpoint is a folder:
    model.safetensors        the student's state dict (tied weights stored once)
    optimizer.safetensors    AdamW state tensors, keyed "<param index>.<name>" (exp_avg, exp_avg_sq, step)
    rng-rank<r>.safetensors  each rank's torch CPU (and CUDA) RNG state
    state.json               format tag, run state (stage, step, data position, losses), optimizer
                             param groups and scalar state, python RNG state

state.json marks a complete folder: it is written last, atomically (``state.json.part``, fsync,
``os.replace``), after every other file is on disk, and it is the first file deleted when a folder goes.
A save of ``latest`` writes the new checkpoint to ``latest.tmp``, then renames ``latest`` -> ``latest.old``
and ``latest.tmp`` -> ``latest``, then deletes ``latest.old``. A run killed at any point of that leaves a
complete checkpoint that :func:`find_checkpoint` resolves: ``latest`` when it exists, else a complete
``latest.tmp`` (the new one: killed between the two renames), else a complete ``latest.old`` (the
previous one). The next save first finishes such an interrupted rotation (the complete leftover becomes
``latest``) and only then clears the leftovers, so the checkpoint a run resumed from is never deleted
before a newer one replaces it.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from ..errors import CheckpointError

FORMAT = "m2convert.distill-checkpoint"
VERSION = 1

log = logging.getLogger("m2convert.recover")


def rng_state() -> dict[str, torch.Tensor]:
    """This process's torch RNG states as tensors (CPU, and every CUDA device when present)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda{i}"] = s
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if torch.cuda.is_available():
        cuda = [state[k] for k in sorted(k for k in state if k.startswith("cuda"))]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)


def _optimizer_to_files(optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{key}"] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def save_checkpoint(path, model: torch.nn.Module, optimizer, state: dict, *, rank: int = 0,
                    world: int = 1, barrier=None) -> Path:
    """Save model, optimizer, RNG and the JSON-able ``state`` to the folder ``path`` atomically.

    Under data parallelism every rank calls this (each writes its RNG state) and passes ``barrier``;
    rank 0 writes the rest and renames the folder into place. ``optimizer`` is an optimizer, its
    (index-keyed) state dict, or None. A kill at any point leaves the previous or the new checkpoint
    for :func:`find_checkpoint` (see the module docstring).

    Example:
        >>> model = nn.Linear(4, 2)
        >>> opt = torch.optim.AdamW(model.parameters())
        >>> save_checkpoint("runs/ckpt/latest", model, opt, {"stage_index": 0, "stage_step": 10})
        PosixPath('runs/ckpt/latest')
        >>> read_state("runs/ckpt/latest")["state"]
        {'stage_index': 0, 'stage_step': 10}
    """
    path = Path(path)
    tmp, old = _siblings(path)
    sync = barrier or (lambda: None)
    if rank == 0:
        _finish_rotation(path)
        tmp.mkdir(parents=True)
    sync()
    _write_tensors(rng_state(), tmp / f"rng-rank{rank}.safetensors")
    if rank == 0:
        save_model(model, str(tmp / "model.safetensors"))
        _fsync(tmp / "model.safetensors")
        opt_meta = None
        if optimizer is not None:
            tensors, opt_meta = _optimizer_to_files(optimizer)
            _write_tensors(tensors, tmp / "optimizer.safetensors")
        doc = {"format": FORMAT, "version": VERSION, "world_size": world, "state": state,
               "optimizer": opt_meta, "python_rng": _py_rng_to_json(random.getstate())}
    sync()                                          # every rank's RNG file is on disk before state.json
    if rank == 0:
        _write_json(tmp / "state.json", doc)
        if path.exists():
            path.rename(old)
        tmp.rename(path)                            # between the renames, the new checkpoint is latest.tmp
        _fsync(path.parent)
        _remove(old, ignore_errors=True)            # a leftover goes at the next save
    sync()
    return path


def find_checkpoint(path) -> Path | None:
    """The folder holding the complete checkpoint saved to ``path``, or None when nothing was saved there.

    That is ``path`` itself, or, after a run killed between the renames of a save, the complete
    ``<path>.tmp`` (the new checkpoint) or ``<path>.old`` (the previous one), with a warning that says
    which. Raises CheckpointError when only leftovers of an interrupted save lie there (a run killed
    during its first save): resuming from them would silently start over.

    Example:
        >>> _ = save_checkpoint("runs/ckpt/latest", nn.Linear(4, 2), None, {"stage_step": 1})
        >>> find_checkpoint("runs/ckpt/latest")
        PosixPath('runs/ckpt/latest')
    """
    path = Path(path)
    if _holds_files(path):
        return path                                 # read_state says whether it is a checkpoint
    tmp, old = _siblings(path)
    for folder, which in ((tmp, "the new checkpoint"), (old, "the previous checkpoint")):
        if _complete(folder):
            log.warning("%s is missing: a save was stopped between its renames; using %s, %s",
                        path, folder, which)
            return folder
    leftovers = [p.name for p in (tmp, old) if p.exists()]
    if leftovers:
        raise CheckpointError(f"{path.parent} holds no complete checkpoint, only {', '.join(leftovers)} of a "
                              f"save that was stopped; delete {', '.join(leftovers)} (or the folder) to start "
                              f"from the beginning")
    return None


def _siblings(path: Path) -> tuple[Path, Path]:
    """The folders a save of ``path`` writes to (``.tmp``) and moves the previous checkpoint to (``.old``)."""
    return path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")


def _complete(folder: Path) -> bool:
    return (folder / "state.json").is_file()


def _holds_files(folder: Path) -> bool:
    return folder.is_dir() and any(folder.iterdir())


def _finish_rotation(path: Path) -> None:
    """Bring a save that was stopped to its end: the leftover find_checkpoint would resume from becomes
    ``path``, then the other leftovers go."""
    tmp, old = _siblings(path)
    if not _holds_files(path):
        for folder in (tmp, old):
            if _complete(folder):
                if path.exists():
                    path.rmdir()
                folder.rename(path)
                _fsync(path.parent)
                break
    _remove(tmp)
    _remove(old)


def _remove(folder: Path, ignore_errors: bool = False) -> None:
    """Delete a checkpoint folder, state.json first so that a half-deleted folder is never complete."""
    if not folder.exists():
        return
    try:
        (folder / "state.json").unlink(missing_ok=True)
        shutil.rmtree(folder)
    except OSError:
        if not ignore_errors:
            raise


def _write_tensors(tensors: dict[str, torch.Tensor], file: Path) -> None:
    save_file(tensors, str(file))
    _fsync(file)


def _write_json(file: Path, doc: dict) -> None:
    """Write ``file`` so that it is either absent or whole: a sibling, fsync, then os.replace."""
    part = file.with_name(file.name + ".part")
    with open(part, "w") as f:
        f.write(json.dumps(doc))
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, file)
    _fsync(file.parent)


def _fsync(path: Path) -> None:
    """Flush a file (or, on POSIX, a folder's entries) to disk."""
    if path.is_dir() and os.name != "posix":
        return                                      # folders cannot be opened for fsync there
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_state(path) -> dict | None:
    """The state.json document of the checkpoint at ``path`` (None when there is none)."""
    path = Path(path)
    file = path / "state.json"
    if not file.exists():
        if path.exists() and any(path.iterdir()):
            raise CheckpointError(f"{path} has files but no state.json: not an m2convert distill checkpoint")
        return None
    try:
        doc = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is corrupt ({e}); delete the folder to start over") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CheckpointError(f"{file} is not an m2convert distill checkpoint (format {doc.get('format')!r})"
                              if isinstance(doc, dict) else f"{file} is not an m2convert distill checkpoint")
    if doc.get("version") != VERSION:
        raise CheckpointError(f"{file} has checkpoint version {doc.get('version')}, this m2convert reads {VERSION}")
    return doc


def load_model_weights(path, model: torch.nn.Module) -> None:
    """Load ``model.safetensors`` of the checkpoint into ``model`` (strict; names and shapes must match)."""
    file = Path(path) / "model.safetensors"
    try:
        missing, unexpected = load_model(model, str(file), strict=False)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{file} cannot be loaded into {type(model).__name__}: {e}") from None
    if missing or unexpected:
        raise CheckpointError(f"{file} does not match {type(model).__name__}: missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(unexpected)[:5]}")


def read_optimizer(path, doc: dict) -> dict:
    """The optimizer state dict (index-keyed, as ``optimizer.state_dict()``) saved beside ``doc``."""
    file = Path(path) / "optimizer.safetensors"
    if doc.get("optimizer") is None or not file.exists():
        raise CheckpointError(f"{path} holds no optimizer state to resume this stage from")
    try:
        return _optimizer_from_files(load_file(str(file)), doc["optimizer"])
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{file} is corrupt: {e}") from None


def load_optimizer(path, optimizer, doc: dict) -> None:
    """Restore the optimizer state saved beside ``doc`` (the checkpoint's state.json)."""
    sd = read_optimizer(path, doc)
    try:
        optimizer.load_state_dict(sd)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{Path(path) / 'optimizer.safetensors'} does not fit this stage's optimizer: "
                              f"{e}") from None


def load_rng(path, doc: dict, rank: int = 0) -> None:
    """Restore this rank's torch and python RNG states."""
    file = Path(path) / f"rng-rank{rank}.safetensors"
    try:
        set_rng_state(load_file(str(file)))
    except (SafetensorError, OSError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{file} is missing or corrupt: {e}") from None
    random.setstate(_py_rng_from_json(doc["python_rng"]))


def _py_rng_to_json(state):
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _py_rng_from_json(state):
    version, internal, gauss = state
    return (version, tuple(internal), gauss)
