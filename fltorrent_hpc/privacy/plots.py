"""Figures of the privacy study: measured ASR (mean over seeds, min-max band) with the paper's values beside.

`plot_privacy(study, out_dir)` takes the dict `sweeps.privacy_study` returns (or any subset of its keys)
and writes one PNG per study; it returns the paths so a report can embed them.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from .attacks import PAPER_ATTACKS

COLORS = {"sequence": "tab:blue", "count": "tab:orange", "cluster": "tab:green"}


def _by(rows: list[dict[str, Any]], key: str) -> dict[Any, list[dict[str, Any]]]:
    """Rows grouped by `key`: numeric keys ascending, categorical keys in first-seen order."""
    out: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        out[r[key]].append(r)
    if all(isinstance(k, (int, float)) for k in out):
        return dict(sorted(out.items()))
    return dict(out)


def _stat(group: list[dict[str, Any]], col: str) -> tuple[float, float, float]:
    v = np.array([np.nan if g.get(col) is None else g[col] for g in group], dtype=float)
    if not np.isfinite(v).any():
        return np.nan, np.nan, np.nan
    return float(np.nanmean(v)), float(np.nanmin(v)), float(np.nanmax(v))


Curve = tuple[str, str, str, str]  # label, column, color, matplotlib format


def _line_panel(ax, rows: list[dict[str, Any]], xkey: str, curves: list[Curve], xlabel: str) -> None:
    groups = _by(rows, xkey)
    xs = np.array(list(groups), dtype=float)
    for label, col, color, fmt in curves:
        stats = np.array([_stat(g, col) for g in groups.values()])
        if not np.isfinite(stats[:, 0]).any():
            continue
        ax.plot(xs, 100 * stats[:, 0], fmt, color=color, label=label)
        if not col.startswith("paper_"):
            ax.fill_between(xs, 100 * stats[:, 1], 100 * stats[:, 2], color=color, alpha=0.12)
    base = np.array([_stat(g, "baseline")[0] for g in groups.values()])
    if np.isfinite(base).any():
        ax.plot(xs, 100 * base, ":", color="gray", label="baseline max 1/|N(v)|")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("ASR (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)


def plot_privacy(study: dict[str, list[dict[str, Any]]], out_dir: str | Path) -> list[Path]:
    """Write privacy_<study>.png for every study present; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []

    if study.get("ablation"):
        groups = _by(study["ablation"], "privacy")
        names = list(groups)
        fig, ax = plt.subplots(figsize=(8, 3.6))
        w = 0.13
        x = np.arange(len(names))
        for i, a in enumerate(PAPER_ATTACKS):
            meas = np.array([_stat(groups[nm], f"{a}_max")[0] for nm in names])
            pap = np.array([_stat(groups[nm], f"paper_{a}_max")[0] for nm in names])
            ax.bar(x + (2 * i - 2.5) * w, 100 * meas, w, color=COLORS[a], label=f"{a} (measured)")
            ax.bar(
                x + (2 * i - 1.5) * w,
                100 * np.nan_to_num(pap),
                w,
                color=COLORS[a],
                alpha=0.35,
                hatch="//",
                label=f"{a} (paper)",
            )
        ax.set_xticks(x, names)
        ax.set_ylabel("max ASR (%)")
        ax.set_title("Defence ablation (n=100, m=10)")
        ax.legend(fontsize=7, ncol=3)
        ax.grid(axis="y", alpha=0.3)
        files.append(_save(fig, out / "privacy_ablation.png"))

    measured = [(f"{a} max (measured)", f"{a}_max", COLORS[a], "o-") for a in PAPER_ATTACKS]
    measured.append(("elimination max (protocol-aware)", "elimination_max", "tab:red", "d-"))
    panels = [
        ("degree", "m", "minimum degree m", [("paper (attack unstated)", "paper_sequence_max", "k", "x--")]),
        ("spray", "R", "spray ratio R", [("paper (attack unstated)", "paper_sequence_max", "k", "x--")]),
        ("peers", "n", "peers n", [(f"{a} (paper)", f"paper_{a}_max", COLORS[a], "x--") for a in PAPER_ATTACKS]),
    ]
    for name, xkey, xlabel, paper in panels:
        if study.get(name):
            fig, ax = plt.subplots(figsize=(5.5, 3.6))
            _line_panel(ax, study[name], xkey, measured + paper, xlabel)
            ax.set_title(f"max ASR vs {xlabel} (full defences)", fontsize=9)
            files.append(_save(fig, out / f"privacy_{name}.png"))

    if study.get("coalition"):
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        curves: list[Curve] = []
        for a in ("sequence", "count"):
            curves += [
                (f"{a} pooled, spray linked", f"{a}_mean", COLORS[a], "o-"),
                (f"{a} pooled, overlay only", f"{a}_mean_overlay_only", COLORS[a], "s--"),
                (f"{a} any member", f"{a}_any", COLORS[a], "^:"),
            ]
        curves += [
            ("any succeeds (paper)", "paper_any", "k", "x--"),
            ("per attacker (paper)", "paper_per_member", "k", "+-."),
        ]
        _line_panel(ax, study["coalition"], "a", curves, "attackers a")
        ax.set_title("colluding coalitions, mean over coalitions (n=100, m=10)", fontsize=9)
        files.append(_save(fig, out / "privacy_coalition.png"))
    return files


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
