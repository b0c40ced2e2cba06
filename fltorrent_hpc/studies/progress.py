"""What a running study shows: one line per finished point and a progress bar over points (rich); without a
terminal, plain lines and a heartbeat every HEARTBEAT_S."""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

from .registry import Point


def point_line(p: Point, res: dict[str, Any]) -> str:
    s = res["summary"]
    bits = [f"[green]done[/green] {p.name}"]
    for key, fmt in (
        ("round_s", "round {:.0f}s"),
        ("warmup_s", "warm-up {:.0f}s"),
        ("warmup_share", "share {:.1%}"),
        ("utilization", "util {:.1%}"),
        ("gff_maxflow_ratio", "GFF/max-flow {:.3f}"),
    ):
        if isinstance(s.get(key), (int, float)):
            bits.append(fmt.format(s[key]))
    bits.append(f"wall {res['elapsed_s']:.1f}s")
    return "  ".join(bits)


class StudyProgress:
    """rich progress over points; without a terminal, plain lines, at least one every HEARTBEAT_S.

    A point can run for minutes, so a log or pipe gets a heartbeat line between finished points too.
    """

    HEARTBEAT_S = 10.0

    def __init__(self, total: int, already: int, label: str, quiet: bool) -> None:
        self.total, self.already, self.label, self.quiet = total, already, label, quiet
        self.p = None
        self.done = already
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def __enter__(self) -> StudyProgress:
        if not self.quiet:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.p = Progress(
                TextColumn(f"study {self.label}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                disable=not sys.stderr.isatty(),
            )
            self.p.start()
            self.task = self.p.add_task(self.label, total=self.total, completed=self.already)
            from ..swarm.bt_kernel import compile_note

            note = compile_note()
            if note:
                self.note(note)
            if self.p.disable:
                self.note(
                    f"study {self.label}: {self.total - self.already} point(s) to run; a line every "
                    f"{self.HEARTBEAT_S:.0f}s"
                )
                self._beat = threading.Thread(target=self._heartbeat, name="study-heartbeat", daemon=True)
                self._beat.start()
        return self

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.HEARTBEAT_S):
            self.note(f"study {self.label}: {self.done}/{self.total} points done, {time.monotonic() - self.t0:.0f}s")

    def note(self, line: str) -> None:
        if self.quiet:
            return
        if self.p is not None and not self.p.disable:
            self.p.console.print(line, soft_wrap=True)
        else:
            from rich.console import Console

            Console(stderr=True, highlight=False).print(line, soft_wrap=True)

    def advance(self) -> None:
        self.done += 1
        if self.p is not None:
            self.p.advance(self.task)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join()
        if self.p is not None:
            self.p.stop()
