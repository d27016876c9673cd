"""Training-state files (training-state-{kimg:06d}.pt): everything a resumed run needs to continue exactly.

A state is a ``torch.save`` of plain data -- tensors, numbers, strings, lists and dicts -- read back with
``torch.load(weights_only=True)``: the network, the optimizer, the image count and tick counters, the seed and
the options as JSON; for a denoiser (``kind`` "denoiser", the default) also its EMAs (half-life and power) and
the loss's state (the schedule sampler's loss history of the iddpm-* losses); for a noisy classifier (``kind``
"classifier", ``edm train-classifier``) its config. No generator state is stored: every random draw of training
is a function of (seed, image position) (streams.py).

Files are written by :func:`edm_toolkit.io.outputs.write_atomically` (a temporary name in the same directory,
flushed to disk, renamed over the target), so a run killed at any moment leaves the previous complete state,
never a truncated one; the next run into the directory removes the killed run's temporary files.
"""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from ..io.outputs import write_atomically

FORMAT = "edm-toolkit/training-state"
VERSION = 1
STATE_PATTERN = re.compile(r"training-state-(\d+)\.pt")
_REQUIRED = {"nimg": int, "cur_tick": int, "tick_start_nimg": int, "seed": int, "options": str, "net": dict,
             "optimizer": dict, "elapsed_sec": float}
KINDS = {"denoiser": {"denoiser": str, "ema": dict, "power_ema": dict},
         "classifier": {"classifier": str}}  # what each kind of run adds; the model's config under its kind
_OPTIONAL = {"loss": dict}


def state_name(nimg: int) -> str:
    return f"training-state-{nimg // 1000:06d}.pt"


def save_state(path: str | Path, state: dict[str, Any]) -> None:
    write_atomically(path, lambda f: torch.save({"format": FORMAT, "version": VERSION, **state}, f), sync=True)


def load_state(path: str | Path) -> dict[str, Any]:
    """A training state, validated: its header, and the presence and types of its entries."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"training state {str(path)!r} not found")
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":  # every torch.save file is a zip archive
            raise CheckpointError(f"{path} is not an edm-toolkit training state; --resume takes a "
                                  "training-state-*.pt written by 'edm train' or its run directory")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"{path} is not a readable training state ({first_line[:160]}); it may be truncated: "
                              "resume from an earlier training-state file") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an edm-toolkit training state (no '{FORMAT}' header); "
                              "--resume takes a training-state-*.pt written by 'edm train' or its run directory")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{path} has training-state version {state.get('version')!r}; this toolkit reads {VERSION}")
    kind = state.setdefault("kind", "denoiser")  # states of version 1 before classifiers were all denoisers
    if kind not in KINDS:
        raise CheckpointError(f"{path} is a training state of an unknown kind {kind!r}")
    for key, expected in {**_REQUIRED, **KINDS[kind]}.items():
        if not isinstance(state.get(key), expected):
            raise CheckpointError(f"{path} is a damaged training state: entry {key!r} is missing or malformed")
    for key, expected in _OPTIONAL.items():
        if key in state and not isinstance(state[key], expected):
            raise CheckpointError(f"{path} is a damaged training state: entry {key!r} is malformed")
    for key in ("options", kind):
        try:
            state[key] = json.loads(state[key])
        except json.JSONDecodeError:
            raise CheckpointError(f"{path} is a damaged training state: entry {key!r} is not JSON") from None
    return state


def latest_state(directory: str | Path) -> Path | None:
    """The training state of the highest kimg in ``directory`` (None if there is none)."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := STATE_PATTERN.fullmatch(p.name)) and p.is_file()]
    return max(found)[1] if found else None
