"""jobs/fedavg_train.py's swarm flags follow the project's precedence: an explicit flag wins over FLTORRENT_*,
which wins over the job's own defaults."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

JOB = Path(__file__).resolve().parents[1] / "jobs" / "fedavg_train.py"


@pytest.fixture(scope="module")
def job():
    spec = importlib.util.spec_from_file_location("fedavg_train_job", JOB)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(spec.name, None)


def test_defaults_then_environment_then_flags(job, monkeypatch):
    for k in ("FLTORRENT_CHUNK_BYTES", "FLTORRENT_DEGREE", "FLTORRENT_TIMEOUT_S"):
        monkeypatch.delenv(k, raising=False)
    a = job.parse_args([])
    assert (a.chunk_bytes, a.degree, a.timeout) == (2048, 2, 300.0)
    monkeypatch.setenv("FLTORRENT_CHUNK_BYTES", "8KiB")
    monkeypatch.setenv("FLTORRENT_DEGREE", "3")
    monkeypatch.setenv("FLTORRENT_TIMEOUT_S", "42")
    a = job.parse_args([])
    assert (a.chunk_bytes, a.degree, a.timeout) == (8192, 3, 42.0)
    a = job.parse_args(["--chunk-bytes", "1KiB", "--degree", "5", "--timeout", "9"])
    assert (a.chunk_bytes, a.degree, a.timeout) == ("1KiB", 5, 9.0)
