"""`fltorrent` command line: simulate a round, attack a trace, run scaling studies, write reports."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import SCHEDULERS, SwarmConfig, parse_bytes, parse_privacy, parse_range, parse_rate
from .errors import ConfigError
from .runtime.simulator import PAPER_CHUNK, PAPER_DOWNLINK, PAPER_UPDATE, PAPER_UPLINK

SUMMARY_ROWS = [
    ("peers", "peers", "{}"),
    ("chunks_per_update", "chunks/update", "{}"),
    ("cover_k", "cover k", "{}"),
    ("stages", "stages", "{}"),
    ("round_s", "round (s)", "{:.1f}"),
    ("warmup_s", "warm-up (s)", "{:.1f}"),
    ("bt_s", "BitTorrent (s)", "{:.1f}"),
    ("bound_s", "capacity bound (s)", "{:.1f}"),
    ("warmup_share", "warm-up share", "{:.1%}"),
    ("utilization", "utilisation", "{:.1%}"),
    ("warmup_utilization", "warm-up utilisation", "{:.1%}"),
    ("complete_fraction", "complete peers", "{:.1%}"),
    ("gate_releases", "gate releases", "{}"),
    ("gff_maxflow_ratio", "GFF / max-flow (transfers)", "{:.3f}"),
    ("maxflow_makespan_ratio", "max-flow / GFF (warm-up stages)", "{:.3f}"),
    ("wall_s", "wall (s)", "{:.1f}"),
    ("peak_rss_bytes", "peak RSS (MiB)", "{}"),
]


def _add_simulate(sub) -> None:
    d = SwarmConfig()  # the paper's protocol defaults; the paper's update, chunk and links come from the simulator
    p = sub.add_parser("simulate", help="simulate one round in slotted time (paper defaults)")
    p.add_argument("--peers", type=int, default=100)
    p.add_argument("--update-bytes", default=str(PAPER_UPDATE), help="e.g. 51.5MiB or 17.1GB")
    p.add_argument("--chunk-bytes", default=str(PAPER_CHUNK))
    p.add_argument("--degree", type=int, default=d.degree, help="minimum overlay degree m")
    p.add_argument("--overlay", choices=["random", "expander"], default="random")
    p.add_argument("--uplink", default=":".join(PAPER_UPLINK), help="LOW:HIGH per-peer uplink")
    p.add_argument("--downlink", default=":".join(PAPER_DOWNLINK), help="LOW:HIGH per-peer downlink")
    p.add_argument(
        "--privacy", default="full", help="full, none, or (protocol paper) a comma list of spray,lags,gating"
    )
    p.add_argument(
        "--protocol",
        choices=["hidden", "paper"],
        default=d.protocol,
        help="hidden: owners seed to non-neighbours and download their own update back (default); paper: warm-up",
    )
    p.add_argument("--seed-peers", type=int, default=d.seed_peers, help="hidden protocol: seed peers per owner")
    p.add_argument("--scheduler", choices=SCHEDULERS, default="gff")
    p.add_argument("--cover", type=float, default=d.cover, help="cover-set threshold K (fraction)")
    p.add_argument("--cover-scope", choices=["swarm", "update"], default="swarm")
    p.add_argument("--spray-ratio", type=float, default=d.spray_ratio)
    p.add_argument("--lag-slots", type=int, default=d.lag_slots)
    p.add_argument("--slot-seconds", type=float, default=1.0)
    p.add_argument("--deadline-stages", type=int, default=0, help="s_max; 0 = 4x the ideal round")
    p.add_argument("--leave", type=float, default=0.0, help="fraction of peers that leave mid-round")
    p.add_argument("--leave-stage", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--maxflow",
        action="store_true",
        help="also compute the stage max-flow bound (GFF / max-flow, on every --maxflow-every-th warm-up stage) "
        "and a max-flow-scheduled warm-up (makespan ratio). Expensive: one max-flow solve per bounded stage and "
        "per stage of that second warm-up (about 1 s each at n=100 on 2 cores; n=100 takes well over 10 min)",
    )
    p.add_argument(
        "--maxflow-every",
        type=int,
        default=10,
        metavar="K",
        help="solve the stage bound on every K-th warm-up stage only (default 10; 1 = every stage)",
    )
    p.add_argument(
        "--model",
        choices=["slotted", "events"],
        default=d.sim_model,
        help="BitTorrent phase in stages of --slot-seconds (slotted, the paper's) or in continuous time with "
        "pipelined requests (events: predicts the pipelined engine; no trace, no --maxflow or --leave)",
    )
    p.add_argument("--trace", default="", metavar="FILE.h5")
    p.add_argument("--json", default="", metavar="FILE.json")
    p.add_argument("--quiet", action="store_true")


def _simulate(a: argparse.Namespace) -> int:
    from .runtime.simulator import simulate
    from .swarm.bt_kernel import compile_note
    from .trace import write_trace

    note = None if a.quiet else compile_note()
    if note:
        print(note, file=sys.stderr, flush=True)
    if a.maxflow and not a.quiet:
        print(
            "--maxflow: one max-flow solve per bounded stage and per stage of a second, max-flow-scheduled warm-up "
            f"(about 1 s each at n=100 on 2 cores); n={a.peers} may take "
            f"{'well over 10 min' if a.peers >= 60 else 'minutes'}",
            file=sys.stderr,
            flush=True,
        )
    cfg = SwarmConfig(
        degree=a.degree,
        overlay=a.overlay,
        chunk_bytes=parse_bytes(a.chunk_bytes),
        privacy=parse_privacy(a.privacy),
        protocol=a.protocol,
        seed_peers=a.seed_peers,
        scheduler=a.scheduler,
        cover=a.cover,
        cover_scope=a.cover_scope,
        spray_ratio=a.spray_ratio,
        lag_slots=a.lag_slots,
        slot_seconds=a.slot_seconds,
        deadline_stages=a.deadline_stages,
        seed=a.seed,
        sim_model=a.model,
    )
    if a.model == "events" and a.trace:
        raise ConfigError("--trace needs --model slotted (the events model has no stages to record)")
    res = simulate(
        cfg,
        a.peers,
        parse_bytes(a.update_bytes),
        parse_range(a.uplink, parse_rate),
        parse_range(a.downlink, parse_rate),
        maxflow=a.maxflow,
        maxflow_every=a.maxflow_every,
        progress=not a.quiet,
        leave_fraction=a.leave,
        leave_stage=a.leave_stage,
        trace=bool(a.trace),
    )
    s = res.summary
    if not a.quiet:
        print_summary(s)
    if a.trace:
        write_trace(a.trace, res.trace)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(s, indent=2))
    return 0


def print_summary(s: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"fltorrent round: privacy={s['privacy']} scheduler={s['scheduler']} seed={s['seed']}")
    t.add_column("figure")
    t.add_column("value", justify="right")
    for key, label, fmt in SUMMARY_ROWS:
        if key in s:
            v = s[key]
            t.add_row(label, fmt.format(v // 2**20 if key == "peak_rss_bytes" else v))
    Console().print(t)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="fltorrent", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    _add_simulate(sub)
    sub.add_parser(
        "attack", help="attribution attacks and bounds on a trace (see `fltorrent attack -h`)", add_help=False
    )
    sub.add_parser("study", help="named scaling studies (see `fltorrent study -h`)", add_help=False)
    sub.add_parser("report", help="plots and tables from a study file (see `fltorrent report -h`)", add_help=False)
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "attack":
            from .privacy.cli import attack_main

            return attack_main(argv[1:])
        if argv and argv[0] in ("study", "report"):
            from .studies.cli import study_main
            from .studies.report import report_main

            return (study_main if argv[0] == "study" else report_main)(argv[1:])
        a = ap.parse_args(argv)
        if a.cmd == "simulate":
            return _simulate(a)
    except ConfigError as e:
        print(f"fltorrent: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
