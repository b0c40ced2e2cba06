"""What a running study shows: one line per finished point and a progress bar over points (rich)."""

from __future__ import annotations

import sys
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
    """rich progress over points (plain lines when quiet or not a terminal)."""

    def __init__(self, total: int, already: int, label: str, quiet: bool) -> None:
        self.total, self.already, self.label, self.quiet = total, already, label, quiet
        self.p = None

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
        return self

    def note(self, line: str) -> None:
        if self.quiet:
            return
        if self.p is not None and not self.p.disable:
            self.p.console.print(line, soft_wrap=True)
        else:
            from rich.console import Console

            Console(stderr=True, highlight=False).print(line, soft_wrap=True)

    def advance(self) -> None:
        if self.p is not None:
            self.p.advance(self.task)

    def __exit__(self, *exc: Any) -> None:
        if self.p is not None:
            self.p.stop()
