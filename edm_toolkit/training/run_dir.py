"""The run directory, laid out as EDM's: {id:05d}-{dataset}-{cond|uncond}-{arch}-{precond}-gpus{W}-batch{B}-{precision}[-desc]
with log.txt, stats.jsonl (one JSON line per tick), training_options.json, network snapshots and training states.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from ..errors import EDMToolkitError
from ..io.outputs import write_atomically
from .state import latest_state

_RUN_ID = re.compile(r"^(\d+)-(.*)$")


def run_description(dataset: str, cond: bool, arch: str, precond: str, world_size: int, batch: int, precision: str,
                    desc: str | None = None) -> str:
    text = f"{dataset}-{'cond' if cond else 'uncond'}-{arch}-{precond}-gpus{world_size}-batch{batch}-{precision}"
    return text if desc is None else f"{text}-{desc}"


def _runs(outdir: Path) -> list[tuple[int, str, Path]]:
    if not outdir.is_dir():
        return []
    runs = []
    for path in outdir.iterdir():
        match = _RUN_ID.match(path.name)
        if match and path.is_dir():
            runs.append((int(match.group(1)), match.group(2), path))
    return sorted(runs)


def next_run_dir(outdir: str | Path, description: str) -> Path:
    """outdir/{id:05d}-{description} with id one above every numbered directory in outdir (EDM's rule)."""
    outdir = Path(outdir)
    run_id = max((i for i, _, _ in _runs(outdir)), default=-1) + 1
    return outdir / f"{run_id:05d}-{description}"


def find_run_to_resume(outdir: str | Path, description: str) -> Path | None:
    """The newest run directory of this description in outdir that holds a training state (--resume auto)."""
    for _, desc, path in reversed(_runs(Path(outdir))):
        if desc == description and latest_state(path) is not None:
            return path
    return None


def create_run_dir(path: Path, exist_ok: bool) -> None:
    """Creates the run directory, turning permission and path problems into one-line errors."""
    try:
        path.mkdir(parents=True, exist_ok=exist_ok)
        probe = path / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except FileExistsError:
        raise EDMToolkitError(f"run directory {str(path)!r} exists already; choose another --outdir") from None
    except OSError as exc:
        raise EDMToolkitError(f"cannot write to --outdir {str(path.parent if not path.exists() else path)!r} "
                              f"({exc.strerror or exc}); choose a writable directory") from None


def write_json(path: Path, data: Any) -> None:
    text = json.dumps(data, indent=2) + "\n"
    write_atomically(path, lambda f: f.write(text.encode()), sync=True)


class RunLog:
    """Prints progress to stdout and appends it to log.txt (EDM's Logger, without redirecting sys.stdout)."""

    def __init__(self, run_dir: Path | None = None, stream: TextIO | None = None):
        self.stream = stream or sys.stdout
        self.file = None
        if run_dir is not None:
            self.file = open(run_dir / "log.txt", "a", encoding="utf-8")

    def __call__(self, text: str = "") -> None:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")  # a path's undecodable bytes as \udcXX
        print(text, file=self.stream, flush=True)
        if self.file is not None:
            self.file.write(text + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class StatsFile:
    """stats.jsonl: one line per tick, {name: {"num", "mean", "std"}, ..., "timestamp"} as EDM's collector."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "stats.jsonl"

    def truncate_after(self, kimg: float) -> None:
        """Drops the lines of ticks past ``kimg``: a resumed run writes them again."""
        truncate_jsonl(self.path, kimg, lambda record: record["Progress/kimg"]["mean"])

    def append(self, stats: dict[str, float | dict[str, float]]) -> None:
        record = {k: v if isinstance(v, dict) else {"num": 1, "mean": v, "std": 0.0} for k, v in stats.items()}
        record["timestamp"] = time.time()
        append_jsonl(self.path, record)


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Appends one JSON line and syncs it to disk."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def truncate_jsonl(path: Path, kimg: float, kimg_of) -> None:
    """Drops the lines of a JSON-lines file whose ``kimg_of(record)`` is past ``kimg`` (and lines cut short by a
    killed run): a resumed run writes them again."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    kept = []
    for line in lines:
        try:
            if kimg_of(json.loads(line)) > kimg + 1e-9:
                continue
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
        kept.append(line)
    text = "".join(line + "\n" for line in kept)
    write_atomically(path, lambda f: f.write(text.encode()), sync=True)


def format_time(seconds: float) -> str:
    """EDM's dnnlib.util.format_time: 12s, 3m 04s, 2h 05m 07s, 1d 02h 03m."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 60 * 60:
        return f"{s // 60}m {s % 60:02}s"
    if s < 24 * 60 * 60:
        return f"{s // 3600}h {(s // 60) % 60:02}m {s % 60:02}s"
    return f"{s // 86400}d {(s // 3600) % 24:02}h {(s // 60) % 60}m"
