"""Whole-round unlinkability against round time: privacy none, the paper's protocol and the hidden protocol.

For every degree m and seed, one simulated round per protocol (the paper's update, chunk and links), every
registered attack scored over the whole round as U (owner among an observer's neighbours; random guess
1/deg), and the round's length in stages next to privacy "none" (BitTorrent only) of the same seed.

    .venv/bin/python jobs/study_unlinkability.py --peers 100 --degrees 5 10 15 20 --seeds 1 2 3 --out results/unlink

Writes rows.json (one row per round), table.md (means over seeds) and tradeoff.png (worst attack's U / (1/deg)
against round time / BitTorrent-only).  docs/RESULTS.md quotes its table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

VARIANTS = {  # name -> (privacy, protocol, extra config)
    "none": ("none", "paper", {}),
    "paper": ("full", "paper", {}),
    "hidden": ("full", "hidden", {}),
    "hidden_r1": ("full", "hidden", {"seed_peers": 1}),
    "hidden_r4": ("full", "hidden", {"seed_peers": 4}),
}


def one(peers: int, m: int, seed: int, variant: str, chunks: int) -> dict:
    from fltorrent_hpc.config import SwarmConfig, parse_rate
    from fltorrent_hpc.privacy.cli import evaluate_trace
    from fltorrent_hpc.runtime.simulator import simulate
    from fltorrent_hpc.studies.paper import PAPER_CHUNK, PAPER_DOWNLINK, PAPER_UPLINK

    privacy, protocol, extra = VARIANTS[variant]
    t0 = time.perf_counter()
    cfg = SwarmConfig(chunk_bytes=PAPER_CHUNK, privacy=privacy, protocol=protocol, degree=m, seed=seed, **extra)
    up = tuple(parse_rate(x) for x in PAPER_UPLINK)
    down = tuple(parse_rate(x) for x in PAPER_DOWNLINK)
    tr = simulate(cfg, peers, chunks * PAPER_CHUNK, uplink=up, downlink=down, trace=True).trace
    res = evaluate_trace(tr, audit=False)
    stages = int(tr.attrs["stages"])
    u = {a: (v["mean"], v["max"]) for a, v in res["u"].items()}
    worst = max(u, key=lambda a: u[a][0])
    return {
        "peers": peers,
        "m": m,
        "seed": seed,
        "variant": variant,
        "stages": stages,
        "u_baseline": res["u_baseline_mean"],
        "u_random_max": res["u_random_max"],
        "u": u,
        "worst": worst,
        "worst_u_mean": u[worst][0],
        "wall_s": time.perf_counter() - t0,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peers", type=int, nargs="+", default=[100])
    p.add_argument("--degrees", type=int, nargs="+", default=[5, 10, 15, 20])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--variants", nargs="+", default=["none", "paper", "hidden"], choices=list(VARIANTS))
    p.add_argument("--chunks", type=int, default=206, help="chunks per update (the paper's 206 x 256 KiB)")
    p.add_argument("--out", default="results/unlink")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows_path = out / "rows.json"
    rows = json.loads(rows_path.read_text()) if rows_path.exists() else []
    done = {(r["peers"], r["m"], r["seed"], r["variant"]) for r in rows}
    todo = [(n, m, s, v) for n in a.peers for m in a.degrees for s in a.seeds for v in a.variants]
    for i, key in enumerate(todo):
        if key in done:
            continue
        r = one(*key, a.chunks)
        rows.append(r)
        rows_path.write_text(json.dumps(rows, indent=1))
        print(
            f"[{i + 1}/{len(todo)}] n={key[0]} m={key[1]} seed={key[2]} {key[3]}: {r['stages']} stages, "
            f"worst U {r['worst']} {100 * r['worst_u_mean']:.2f}% vs 1/deg {100 * r['u_baseline']:.2f}% "
            f"({r['wall_s']:.0f} s)",
            flush=True,
        )
    write_table(rows, out)
    return 0


def write_table(rows: list[dict], out: Path) -> None:
    """Means over seeds: round stages / BitTorrent-only, worst attack's mean U / (1/deg), its name."""
    bt = {(r["peers"], r["m"], r["seed"]): r["stages"] for r in rows if r["variant"] == "none"}
    lines = [
        "| n | m | protocol | 1/deg | worst attack (mean U) | worst U / (1/deg) | max over observers "
        "| round / BT-only |",
        "|---|---|---|---|---|---|---|---|",
    ]
    pts = []
    for n, m, v in sorted({(r["peers"], r["m"], r["variant"]) for r in rows}):
        rs = [r for r in rows if (r["peers"], r["m"], r["variant"]) == (n, m, v)]
        atts = rs[0]["u"].keys()
        mean_u = {a: float(np.mean([r["u"][a][0] for r in rs])) for a in atts}
        worst = max(mean_u, key=mean_u.get)
        base = float(np.mean([r["u_baseline"] for r in rs]))
        umax = float(np.max([r["u"][worst][1] for r in rs]))
        ratio = [r["stages"] / bt[(n, m, r["seed"])] for r in rs if (n, m, r["seed"]) in bt]
        t = float(np.mean(ratio)) if ratio else float("nan")
        lines.append(
            f"| {n} | {m} | {v} | {100 * base:.2f}% | {worst} {100 * mean_u[worst]:.2f}% | "
            f"{mean_u[worst] / base:.2f} | {100 * umax:.1f}% | {t:.3f} |"
        )
        pts.append((v, t, mean_u[worst] / base, m))
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is a project dependency
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for v, marker in (("none", "o"), ("paper", "s"), ("hidden", "^"), ("hidden_r1", "v"), ("hidden_r4", "D")):
        sel = [p for p in pts if p[0] == v]
        if sel:
            ax.scatter([p[1] for p in sel], [p[2] for p in sel], marker=marker, label=v)
            for p in sel:
                ax.annotate(f"m={p[3]}", (p[1], p[2]), fontsize=7)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.axhline(2.0, color="red", lw=0.8, ls=":")
    ax.set_xlabel("round time / BitTorrent-only (same seed)")
    ax.set_ylabel("worst attack mean U / (1/deg)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("whole-round attribution vs round time")
    fig.tight_layout()
    fig.savefig(out / "tradeoff.png", dpi=120)


if __name__ == "__main__":
    sys.exit(main())
