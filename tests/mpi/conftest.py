"""One readable report per `mpiexec -n N pytest --with-mpi` run, instead of N interleaved ones.

Ranks > 0 write their pytest output to a log file of their own (FLTORRENT_MPI_LOG prefix, default
/tmp/fltorrent-mpi, plus `.rankR.log`); at the end they send their outcome counts and failure reports to
rank 0, which prints them with its own and a closing line `N ranks: ...` that tests/mpi/run.sh shows.  Rank 0
waits a bounded time for the others, so a rank stuck in a test cannot hang the report.
"""

from __future__ import annotations

import os
import time

import pytest

_OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")
_TAG = 7717
_WAIT_S = 120.0
_state: dict = {}


def _log_prefix() -> str:
    return os.environ.get("FLTORRENT_MPI_LOG", "/tmp/fltorrent-mpi")


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    if not config.getoption("with_mpi", False):
        return
    from mpi4py import MPI

    if MPI.COMM_WORLD.Get_size() == 1:
        return
    comm = MPI.COMM_WORLD.Dup()  # private channel: no tag clash with messages the tests leave behind
    _state.update(comm=comm, rank=comm.Get_rank(), size=comm.Get_size())
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if comm.Get_rank() > 0 and reporter is not None:
        from _pytest.config import create_terminal_writer

        path = f"{_log_prefix()}.rank{comm.Get_rank()}.log"
        _state["log"] = open(path, "w", buffering=1)  # noqa: SIM115 (open for the whole session)
        reporter._tw = create_terminal_writer(config, _state["log"])  # also where pytest-timeout dumps stacks


def _outcome(reporter) -> dict:
    counts = {k: len(reporter.stats.get(k, [])) for k in _OUTCOMES}
    failures = []
    for key in ("failed", "error"):
        for rep in reporter.stats.get(key, []):
            text = getattr(rep, "longreprtext", "") or ""
            failures.append((key, getattr(rep, "nodeid", "?"), text[-3000:]))
    return {"counts": counts, "failures": failures}


def _fmt(counts: dict) -> str:
    parts = [f"{v} {k}" for k, v in counts.items() if v]
    return ", ".join(parts) or "no tests ran"


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    """Exchange outcomes before the terminal reporter writes its summary."""
    comm = _state.get("comm")
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if comm is not None and reporter is not None:
        from mpi4py import MPI

        mine = _outcome(reporter)
        if _state["rank"] > 0:
            req = comm.isend(mine, dest=0, tag=_TAG)
            deadline = time.monotonic() + _WAIT_S
            while not req.Test() and time.monotonic() < deadline:
                time.sleep(0.01)
        else:
            got = {0: mine}
            deadline = time.monotonic() + _WAIT_S
            while len(got) < _state["size"] and time.monotonic() < deadline:
                status = MPI.Status()
                if comm.iprobe(source=MPI.ANY_SOURCE, tag=_TAG, status=status):
                    got[status.Get_source()] = comm.recv(source=status.Get_source(), tag=_TAG)
                else:
                    time.sleep(0.01)
            _state["gathered"] = got
    yield


def pytest_terminal_summary(terminalreporter):
    got = _state.get("gathered")
    if got is None:
        return
    tr, size = terminalreporter, _state["size"]
    others = [r for r in range(1, size) if r in got]
    missing = [r for r in range(1, size) if r not in got]
    for r in others:
        for key, nodeid, text in got[r]["failures"]:
            tr.write_sep("_", f"rank {r}: {key.upper()} {nodeid}")
            tr.write_line(text)
    total = {k: sum(got[r]["counts"][k] for r in got) for k in _OUTCOMES}
    per_rank = [_fmt(got[r]["counts"]) for r in sorted(got)]
    if len(set(per_rank)) == 1 and not missing:
        detail = f"each rank: {per_rank[0]}"
    else:
        detail = "; ".join(f"rank {r}: {_fmt(got[r]['counts'])}" for r in sorted(got))
    if missing:
        detail += f"; no report from rank(s) {', '.join(map(str, missing))} after {_WAIT_S:.0f}s"
    tr.write_line(f"{size} ranks: {_fmt(total)} ({detail}; rank logs: {_log_prefix()}.rankR.log)")
