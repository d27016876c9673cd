"""Shared test helpers: the reference fixtures of ../shared/fixtures."""

from __future__ import annotations

import builtins
import json
import math
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("EDM_TOOLKIT_FIXTURES", REPO.parent / "shared" / "fixtures"))


def _decode_json(obj):
    """JSON cannot hold infinity: the fixtures write it as the string "inf"."""
    if isinstance(obj, dict):
        return {k: _decode_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode_json(v) for v in obj]
    if obj == "inf":
        return math.inf
    if obj == "-inf":
        return -math.inf
    return obj


class Fixture:
    """One reference case: `meta` (the .json), `state_dict`, `inputs`, `outputs` (the .pt)."""

    def __init__(self, name: str):
        pt = FIXTURES / f"{name}.pt"
        if not pt.exists():
            if os.environ.get("EDM_TOOLKIT_REQUIRE_FIXTURES"):
                raise FileNotFoundError(f"reference fixture {pt} is missing")
            pytest.skip(f"reference fixtures not found at {FIXTURES} (set EDM_TOOLKIT_FIXTURES)")
        self.name = name
        self.meta = _decode_json(json.loads((FIXTURES / f"{name}.json").read_text()))
        data = torch.load(pt, weights_only=True, map_location="cpu")
        self.state_dict = data["state_dict"]
        self.inputs = data["inputs"]
        self.outputs = data["outputs"]


@pytest.fixture(scope="session")
def load_fixture():
    """Returns a cached loader: load_fixture('edm_precond_vp') -> Fixture."""
    cache: dict[str, Fixture] = {}

    def load(name: str) -> Fixture:
        if name not in cache:
            cache[name] = Fixture(name)
        return cache[name]

    return load


@pytest.fixture
def one_thread():
    """One intra-op thread for the duration of a test: the tiny tensors of these tests run fastest that way, above
    all on shared cores where extra threads only wait for each other. The previous setting is restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_code_execution(monkeypatch):
    """Fails the test if exec, eval or compile is called while a file is read."""
    def refuse(*args, **kwargs):
        raise AssertionError("code from the file was compiled or executed")

    for name in ("exec", "eval", "compile"):
        monkeypatch.setattr(builtins, name, refuse)
