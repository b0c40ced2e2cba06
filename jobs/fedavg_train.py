"""Federated training over the swarm: every rank is an FL peer, every round is one `fltorrent_hpc.fedavg_`.

    mpiexec -n 4 python jobs/fedavg_train.py --rounds 10 --baseline central,gossip --out runs/iid
    torchrun --nproc_per_node=4 jobs/fedavg_train.py --rounds 10 --baseline central   # no MPI: torch's gloo
    mpiexec -n 4 python jobs/fedavg_train.py --split dirichlet --alpha 0.1 --baseline central,gossip
    mpiexec -n 4 python jobs/fedavg_train.py --rule median --poison 1 --baseline central
    mpiexec -n 4 python jobs/fedavg_train.py --out runs/iid --resume          # continue from the last checkpoint
    srun --mpi=pmix python jobs/fedavg_train.py ...                            # on Slurm (slurm/train.sbatch)

A small MLP (64-hidden-10) learns scikit-learn's digits (ships with the package; no download), split across
the peers IID or Dirichlet(alpha); 20% is held out as a test set, identically on every rank.  Each round every
peer trains locally (epochs x batches of SGD), then the peers' updates are disseminated by the swarm and
aggregated in place on every peer:

- rule ``fedavg`` (default): ``fltorrent_hpc.fedavg_(model, weight=n_local_samples)``;
- rules ``median``, ``trimmed-mean``, ``krum``: the updates (parameters minus the round's starting
  parameters, fp32) are disseminated by the same swarm round (``swarm_round`` of the "fltorrent" group, as
  fedavg_ does: ``fltorrent_hpc.aggregate_``) and every peer applies the rule (fltorrent_hpc/api/aggregate.py)
  over the agreed reconstructable set, in rank order, on the model's device.

Baselines, run in the same job from the same initial parameters with the same data order:

- ``central``: server FedAvg semantics: the peers' parameters (or updates) are all-gathered (MPI, or the
  torch-native transport under torchrun) and every
  rank reduces them in rank order with the same reduction code (aggregate.py, the kernels fedavg_ uses), so a
  round whose every update arrived must give bit-identical parameters; ``bitexact_rounds`` counts them.
- ``gossip``: decentralised neighbour averaging (D-PSGD style) on an overlay from the swarm's generator
  (``build_overlay`` with the same degree, fresh each round), Metropolis-Hastings weights.  Each peer keeps
  its own model; accuracy is the mean over peers.

``--poison a`` makes a peers (the last a ranks, or the first with ``--poison-ranks first``) publish a poisoned
update: scaled by ``--poison-scale`` (default -10) or sign-flipped; the same poisoned bytes go to the swarm and
to the baselines.

Outputs (run directory ``--out``; rank 0 writes): summary.json (``--json``), curves.png (accuracy and round time
by round), trace/round_NNN.h5 (the HDF5 trace of every swarm round, docs/TRACE.md), ckpt/ (per-rank round
checkpoints: models, optimizers, round, seeds, history; ``--resume`` continues from the newest one every rank
has).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import fltorrent_hpc  # noqa: F401  (registers the "fltorrent" backend, fills the env:// rendezvous)
from fltorrent_hpc.api import aggregate as agg
from fltorrent_hpc.chunks.layout import Layout
from fltorrent_hpc.config import SwarmConfig, parse_bytes, privacy_label
from fltorrent_hpc.errors import NothingToAverageError
from fltorrent_hpc.studies.data import label_histogram, load_digits, partition

BASELINES = ("central", "gossip")
# arguments that must match when resuming (the others, e.g. --rounds, may change)
RESUME_KEYS = (
    "split alpha seed data_seed epochs batch_size lr momentum hidden rule byzantine trim multi_krum poison "
    "poison_mode poison_scale poison_ranks baseline degree test_fraction"
).split()


# ----------------------------------------------------------------------------------------------- arguments


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description="Federated training over the fltorrent swarm (run under mpiexec or srun).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = ap.add_argument_group("training")
    g.add_argument("--rounds", type=int, default=10, help="FL rounds (total, including resumed ones)")
    g.add_argument("--epochs", type=int, default=2, help="local epochs per round")
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--lr", type=float, default=0.1, help="local SGD learning rate")
    g.add_argument("--momentum", type=float, default=0.5, help="local SGD momentum (its state stays on the peer)")
    g.add_argument("--hidden", type=int, default=64, help="MLP hidden width (64 -> hidden -> 10)")
    g.add_argument("--seed", type=int, default=0, help="model init, data order and swarm seed")
    g.add_argument("--data-seed", type=int, default=None, help="test split and peer split seed (default --seed)")
    g.add_argument("--split", default="iid", help="iid or dirichlet (with --alpha); 'dir0.1' also accepted")
    g.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration for --split dirichlet")
    g.add_argument("--test-fraction", type=float, default=0.2, help="held-out test share (same on every rank)")
    g.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK when available), cpu, cuda, cuda:N")
    g.add_argument("--threads", type=int, default=1, help="torch intra-op threads per rank")
    g = ap.add_argument_group("aggregation")
    g.add_argument("--rule", default="fedavg", help=f"aggregation rule: {', '.join(agg.RULES)}")
    g.add_argument("--byzantine", type=int, default=1, help="f, Byzantine peers assumed by krum / trimmed-mean")
    g.add_argument("--trim", type=int, default=None, help="trimmed-mean: values dropped per side (default f)")
    g.add_argument("--multi-krum", type=int, default=1, help="krum: average the m best updates (Multi-Krum)")
    g.add_argument("--poison", type=int, default=0, help="number of poisoned peers")
    g.add_argument("--poison-mode", default="scale", choices=["scale", "signflip"])
    g.add_argument("--poison-scale", type=float, default=-10.0, help="factor applied to a poisoned update (scale)")
    g.add_argument("--poison-ranks", default="last", choices=["last", "first"], help="which ranks are poisoned")
    g.add_argument(
        "--baseline",
        default="none",
        help="comma list of baselines run in the same job: central (server FedAvg, bit-exact check), gossip",
    )
    g = ap.add_argument_group("swarm")
    g.add_argument(
        "--chunk-bytes",
        default=None,
        help="swarm chunk size (default: FLTORRENT_CHUNK_BYTES, else 2KiB: the ~19 KB update becomes ~10 chunks)",
    )
    g.add_argument(
        "--degree",
        type=int,
        default=None,
        help="overlay degree m for the swarm and gossip, m >= n-1: complete graph (default: FLTORRENT_DEGREE, else 2)",
    )
    g.add_argument(
        "--privacy",
        default=None,
        help="full, none, or a list of spray,lags,gating (default: FLTORRENT_PRIVACY, else full)",
    )
    g.add_argument("--deadline", type=float, default=None, help="wall-clock swarm deadline per round (s)")
    g.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="bound on every distributed wait, s (default: FLTORRENT_TIMEOUT_S, else 300)",
    )
    g = ap.add_argument_group("outputs and checkpoints")
    g.add_argument("--out", default=None, help="run directory (default runs/train-YYYYmmdd-HHMMSS)")
    g.add_argument("--json", default=None, help="JSON summary path (default OUT/summary.json)")
    g.add_argument("--png", default=None, help="plot path (default OUT/curves.png)")
    g.add_argument("--no-trace", action="store_true", help="do not write the per-round HDF5 traces")
    g.add_argument("--no-plot", action="store_true")
    g.add_argument("--ckpt-every", type=int, default=1, help="checkpoint every N rounds (0 = never)")
    g.add_argument("--keep-ckpt", type=int, default=3, help="checkpoints kept per rank (0 = all)")
    g.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    g.add_argument("--stop-after", type=int, default=0, help="stop cleanly after this round (testing resume)")
    g.add_argument("--kill-at", type=int, default=0, help="SIGKILL every rank after this round's checkpoint")
    g.add_argument("--quiet", action="store_true", help="no per-round lines")
    g.add_argument("--dump-params", default=None, help="write each rank's final swarm parameters to PATH.rankR.bin")
    g.add_argument(
        "--progress",
        default="auto",
        choices=["auto", "bar", "lines"],
        help="bar: a live progress bar above the per-round lines (use when mpiexec's output is a terminal; "
        "ranks only see a pipe, so auto means lines unless rank 0's stdout is a terminal)",
    )
    return ap


JOB_DEFAULTS = {"chunk_bytes": "2KiB", "degree": 2, "timeout": 300.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    a = build_parser().parse_args(argv)
    a.rule = agg.canonical_rule(a.rule)
    base = [b.strip().lower() for b in a.baseline.split(",") if b.strip() and b.strip().lower() != "none"]
    bad = [b for b in base if b not in BASELINES]
    if bad:
        raise SystemExit(f"--baseline: unknown {bad}; choose from none, {', '.join(BASELINES)}")
    a.baselines = [b for b in BASELINES if b in base]
    a.baseline = ",".join(a.baselines) or "none"
    if a.split.lower().startswith("dir") and a.split.lower() not in ("dir", "dirichlet"):
        from fltorrent_hpc.studies.data import parse_split

        _, a.alpha = parse_split(a.split)
        a.split = "dirichlet"
    a.split = a.split.lower()
    if a.split == "dir":
        a.split = "dirichlet"
    if a.split not in ("iid", "dirichlet"):
        raise SystemExit(f"--split must be iid or dirichlet, got {a.split!r}")
    if a.data_seed is None:
        a.data_seed = a.seed
    for name in ("rounds", "epochs", "batch_size", "hidden", "threads"):
        if getattr(a, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    if a.poison < 0:
        raise SystemExit("--poison must be >= 0")
    # swarm knobs: an explicit flag wins over FLTORRENT_*, which wins over this job's defaults
    d = JOB_DEFAULTS
    env = SwarmConfig.from_env(SwarmConfig(chunk_bytes=d["chunk_bytes"], degree=d["degree"], timeout_s=d["timeout"]))
    a.chunk_bytes = a.chunk_bytes if a.chunk_bytes is not None else env.chunk_bytes
    a.degree = a.degree if a.degree is not None else env.degree
    a.timeout = a.timeout if a.timeout is not None else env.timeout_s
    return a


def split_name(a: argparse.Namespace) -> str:
    return "iid" if a.split == "iid" else f"dir{a.alpha:g}"


# ----------------------------------------------------------------------------------------------- collectives


_COLLS = itertools.count()


class Coll:
    """Bounded collectives of the job itself (numpy buffers only, never pickle) on a transport of its own: a
    duplicate of MPI COMM_WORLD under mpiexec/srun, the torch-native transport over torchrun's env:// store
    otherwise (then `store` is (store, rank, size), which the "fltorrent" group is built on too)."""

    def __init__(self, timeout_s: float):
        from fltorrent_hpc.launch import env_store, transport_choice

        self.store: tuple | None = None
        if transport_choice() == "mpi":
            from mpi4py import MPI

            from fltorrent_hpc.transport.mpi import MPITransport

            self.net = MPITransport(MPI.COMM_WORLD, "fedavg_train")
        else:
            from fltorrent_hpc.transport.torch_p2p import connect

            self.store = env_store(timeout_s)
            store, rank, size = self.store
            name = f"fedavg_train-{next(_COLLS)}"  # train() may run more than once in a process (tests)
            self.net = connect(store, rank, size, timeout_s=timeout_s, name=name)
        self.rank, self.size = self.net.rank, self.net.size
        self.timeout_s = timeout_s

    def allgather(self, arr: np.ndarray, what: str = "allgather") -> np.ndarray:
        from fltorrent_hpc.transport.base import allgather

        return allgather(self.net, np.ascontiguousarray(arr), self.timeout_s, f"{what} over {self.size} ranks")

    def allreduce(self, values, op: str = "sum", dtype=np.float64) -> np.ndarray:
        """An all-gather, then the reduction in rank order on every rank (the same bits everywhere)."""
        rows = self.allgather(np.asarray(values, dtype=dtype).reshape(-1), f"allreduce({op})")
        out = rows[0].copy()
        for r in rows[1:]:
            out = out + r if op == "sum" else np.minimum(out, r) if op == "min" else np.maximum(out, r)
        return out

    def bcast_bytes(self, data: bytes, width: int = 4096) -> bytes:
        buf = np.zeros(width, dtype=np.uint8)
        if self.rank == 0:
            if len(data) > width:
                raise ValueError(f"broadcast record of {len(data)} bytes exceeds {width}")
            buf[: len(data)] = np.frombuffer(data, dtype=np.uint8)
        return bytes(self.allgather(buf, "broadcast")[0]).rstrip(b"\0")

    def barrier(self) -> None:
        self.allgather(np.zeros(1, dtype=np.uint8), "barrier")

    def free(self) -> None:
        self.net.close()


def get_group(a: argparse.Namespace, trace_path: str, coll: Coll) -> Any:
    """The "fltorrent" default process group (created here unless the caller already made one)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        where: dict[str, Any] = {}
        if coll.store is not None:  # no MPI: the group shares the job's env:// store (one rendezvous)
            store, rank, size = coll.store
            where = {"store": dist.PrefixStore("fltorrent_group/", store), "rank": rank, "world_size": size}
        elif "RANK" not in os.environ:  # a plain `python jobs/fedavg_train.py` under FLTORRENT_TRANSPORT=mpi
            from fltorrent_hpc.launch import rendezvous

            rendezvous()
        base = SwarmConfig(
            chunk_bytes=parse_bytes(a.chunk_bytes),
            degree=a.degree,
            seed=a.seed,
            timeout_s=a.timeout,
            trace=trace_path,
        )
        # FLTORRENT_* fill every knob this job leaves open; the resolved flags (explicit > FLTORRENT_* > the
        # job's defaults, see parse_args) and an explicit --privacy then win
        cfg = SwarmConfig.from_env(base).replace(
            chunk_bytes=parse_bytes(a.chunk_bytes), degree=a.degree, timeout_s=a.timeout
        )
        if a.privacy is not None:
            cfg = cfg.replace(privacy=a.privacy)
        dist.init_process_group("fltorrent", pg_options=cfg, timeout=timedelta(seconds=a.timeout), **where)
    if dist.get_backend() != "fltorrent":
        raise RuntimeError(f"fedavg_train needs the 'fltorrent' default group, found {dist.get_backend()!r}")
    return dist.group.WORLD


# ----------------------------------------------------------------------------------------------- model, data


def make_model(n_in: int, hidden: int, n_out: int, seed: int) -> torch.nn.Module:
    g = torch.random.fork_rng(devices=[])
    with g:
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(n_in, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, n_out))


def fl_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    """What fedavg_ averages, in its order: the parameters, then the floating-point buffers."""
    ts = [p for _, p in model.named_parameters()]
    ts += [b for _, b in model.named_buffers() if b.dtype in (torch.float32, torch.float16, torch.bfloat16)]
    return ts


def round_seed(seed: int, rank: int, rnd: int) -> int:
    """Seed of a peer's data order in a round: a pure function, so a resumed run replays it exactly."""
    return int(np.random.SeedSequence([seed, rank, rnd, 0x5EED]).generate_state(1)[0])


def train_local(
    model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, a, seed: int
) -> tuple[float, int]:
    """Local SGD epochs; returns (sum of batch losses x batch sizes, samples seen)."""
    gen = torch.Generator().manual_seed(seed)
    model.train()
    n = x.shape[0]
    loss_sum = torch.zeros((), dtype=torch.float64, device=x.device)
    seen = 0
    for _ in range(a.epochs):
        perm = torch.randperm(n, generator=gen).to(x.device)
        for b in range(0, n, a.batch_size):
            idx = perm[b : b + a.batch_size]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
            loss_sum += loss.detach().double() * idx.numel()
            seen += int(idx.numel())
    return float(loss_sum), seen


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    logits = model(x)
    return float((logits.argmax(1) == y).double().mean()), float(F.cross_entropy(logits, y))


def same_params(m1: torch.nn.Module, m2: torch.nn.Module) -> bool:
    return all(
        a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b) for a, b in zip(fl_tensors(m1), fl_tensors(m2))
    )


# ----------------------------------------------------------------------------------------------- one round


@dataclass
class SwarmStats:
    participants: list[int]
    bytes_sent: int = 0
    bytes_recv: int = 0
    warmup_s: float = 0.0
    swarm_s: float = 0.0
    round_s: float = 0.0
    extra: dict = field(default_factory=dict)


@torch.no_grad()
def keep_start_(tensors: list[torch.Tensor], start: list[torch.Tensor]) -> None:
    """A round with an empty agreed set leaves the global model where the round started, on every rank."""
    for t, s in zip(tensors, start):
        t.copy_(s)


@torch.no_grad()
def poison_(tensors: list[torch.Tensor], start: list[torch.Tensor], factor: float) -> None:
    """Published parameters of a poisoned peer: start + factor * (trained - start), in fp32."""
    for t, s in zip(tensors, start):
        t.copy_((s.float() + factor * (t.float() - s.float())).to(t.dtype))


def swarm_fedavg(model, weight: float, start: list[torch.Tensor], a) -> SwarmStats:
    try:
        rep = fltorrent_hpc.fedavg_(model, weight=weight, deadline=a.deadline, privacy=a.privacy)
    except NothingToAverageError as e:  # fedavg_ raises it on every rank when A is empty
        keep_start_(fl_tensors(model), start)
        return SwarmStats([], extra={"empty_set": str(e)})
    return SwarmStats(
        list(rep.participants), rep.bytes_sent, rep.bytes_recv, rep.warmup_s, rep.swarm_s, rep.round_s, rep.stats
    )


def swarm_robust(pg, tensors, start, delta: torch.Tensor, weight: float, a) -> SwarmStats:
    """Disseminate this peer's fp32 update with the swarm, then apply the robust rule over the agreed set."""
    try:
        rep = fltorrent_hpc.aggregate_(
            tensors,
            start,
            delta,
            a.rule,
            weight,
            group=pg,
            deadline=a.deadline,
            privacy=a.privacy,
            f=a.byzantine,
            trim=a.trim,
            multi=a.multi_krum,
        )
    except NothingToAverageError as e:  # nobody's update was reconstructed everywhere by the deadline
        keep_start_(tensors, start)
        return SwarmStats([], extra={"empty_set": str(e)})
    return SwarmStats(
        list(rep.participants), rep.bytes_sent, rep.bytes_recv, rep.warmup_s, rep.swarm_s, rep.round_s, rep.stats
    )


def central_aggregate(coll: Coll, model, start, delta: torch.Tensor | None, weight: float, a) -> None:
    """Server semantics over every peer: all-gather, then the same rank-order reduction code on every rank."""
    from fltorrent_hpc.chunks.kernels import pack_segments

    ws = coll.allgather(np.array([weight], dtype=np.float64), "central weights").reshape(-1)
    tensors = fl_tensors(model)
    if a.rule == "fedavg":
        layout = Layout.from_tensors(tensors)
        mine = pack_segments([t.detach() for t in tensors], layout).cpu().numpy()
        allp = coll.allgather(mine, "central parameters")
        agg.fedavg_packed_(tensors, layout, list(allp), [float(w) for w in ws])
        return
    rows = coll.allgather(delta.cpu().numpy(), "central updates")
    upd = torch.from_numpy(rows).to(delta.device)
    res = agg.aggregate(a.rule, upd, [float(w) for w in ws], f=a.byzantine, trim=a.trim, multi=a.multi_krum)
    agg.apply_update_(tensors, start, res)


def metropolis_weights(overlay, i: int) -> tuple[list[int], list[float]]:
    """Peers i averages with (itself and its neighbours, ascending) and their Metropolis-Hastings weights."""
    deg = overlay.degree
    nb = sorted(int(j) for j in overlay.neighbors[i])
    w = {j: 1.0 / (1.0 + max(int(deg[i]), int(deg[j]))) for j in nb}
    w[i] = 1.0 - sum(w.values())
    peers = sorted(w)
    return peers, [w[j] for j in peers]


def gossip_mix(coll: Coll, model, overlay) -> None:
    from fltorrent_hpc.chunks.kernels import pack_segments

    tensors = fl_tensors(model)
    layout = Layout.from_tensors(tensors)
    mine = pack_segments([t.detach() for t in tensors], layout).cpu().numpy()
    allp = coll.allgather(mine, "gossip parameters")  # fine at small n; a real deployment sends to neighbours
    peers, w = metropolis_weights(overlay, coll.rank)
    agg.fedavg_packed_(tensors, layout, [allp[j] for j in peers], w)


# ----------------------------------------------------------------------------------------------- checkpoints


def ckpt_path(out: Path, rnd: int, rank: int) -> Path:
    return out / "ckpt" / f"round_{rnd:04d}.rank{rank}.pt"


def save_checkpoint(out: Path, rnd: int, rank: int, state: dict) -> Path:
    p = ckpt_path(out, rnd, rank)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, p)  # atomic: a kill leaves the previous round's file or this one, never half of one
    return p


def prune_checkpoints(out: Path, rank: int, keep: int) -> None:
    if keep <= 0:
        return
    mine = sorted((out / "ckpt").glob(f"round_*.rank{rank}.pt"))
    for p in mine[:-keep]:
        p.unlink(missing_ok=True)


def newest_common_checkpoint(coll: Coll, out: Path, max_round: int) -> int:
    """The newest round every rank has a checkpoint for (0 = none)."""
    have = np.zeros(max_round + 1, dtype=np.int64)
    for r in range(1, max_round + 1):
        have[r] = int(ckpt_path(out, r, coll.rank).exists())
    both = coll.allreduce(have, "min", dtype=np.int64)
    hits = np.flatnonzero(both[1:]) + 1
    return int(hits[-1]) if hits.size else 0


# ----------------------------------------------------------------------------------------------- display


class Display:
    """Rank 0's per-round lines, with a rich progress bar on a terminal and plain lines otherwise."""

    COLS = (
        "round",
        "acc",
        "central",
        "gossip",
        "train_loss",
        "test_loss",
        "A",
        "MB_moved",
        "warmup_s",
        "swarm_s",
        "round_s",
        "bitexact",
    )

    def __init__(self, enabled: bool, total: int, start: int, mode: str = "auto"):
        self.enabled = enabled
        self.progress = None
        self.task = None
        if not enabled:
            return
        from rich.console import Console

        self.console = Console(highlight=False, soft_wrap=True, force_terminal=True if mode == "bar" else None)
        if mode != "lines" and self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(
                TextColumn("[bold]FL rounds"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=self.console,
            )
            self.progress.start()
            self.task = self.progress.add_task("rounds", total=total, completed=start)

    def print(self, text: str) -> None:
        if self.enabled:
            (self.progress.console if self.progress else self.console).print(text, markup=False)
            if not self.progress:
                sys.stdout.flush()

    def header(self) -> None:
        self.print(
            f"{'round':>5} {'acc':>6} {'central':>7} {'gossip':>6} {'trn_loss':>8} {'tst_loss':>8} {'|A|':>5} "
            f"{'MB moved':>8} {'warmup_s':>8} {'swarm_s':>8} {'round_s':>8} {'bitexact':>8}"
        )

    def row(self, r: dict, n: int) -> None:
        def f(v, w, p=4):
            return f"{'-':>{w}}" if v is None else f"{v:>{w}.{p}f}"

        be = "-" if r.get("bitexact") is None else ("yes" if r["bitexact"] else "NO")
        self.print(
            f"{r['round']:>5d} {f(r['accuracy'], 6)} {f(r.get('central_accuracy'), 7)} "
            f"{f(r.get('gossip_accuracy'), 6)} {f(r['train_loss'], 8)} {f(r['test_loss'], 8)} "
            f"{len(r['participants']):>2d}/{n:<2d} {r['bytes_moved'] / 1e6:>8.3f} {r['warmup_s']:>8.3f} "
            f"{r['swarm_s']:>8.3f} {r['round_s']:>8.3f} {be:>8}"
        )
        if self.progress is not None:
            self.progress.update(self.task, advance=1)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


# ----------------------------------------------------------------------------------------------- training


def pick_device(spec: str) -> torch.device:
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        return torch.device("cpu")
    return torch.device(spec)


def run_dir(coll: Coll, a: argparse.Namespace) -> Path:
    """--out, or runs/train-<rank 0's time> (broadcast, so every rank agrees)."""
    if a.out:
        return Path(a.out)
    name = f"runs/train-{datetime.now().strftime('%Y%m%d-%H%M%S')}".encode() if coll.rank == 0 else b""
    return Path(coll.bcast_bytes(name).decode())


def train(a: argparse.Namespace) -> dict:
    """Run (or resume) the federated training described by `a` on every rank; returns the summary (collective)."""
    t_start = time.perf_counter()
    torch.set_num_threads(a.threads)
    coll = Coll(a.timeout)
    rank, n = coll.rank, coll.size
    out = run_dir(coll, a)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    coll.barrier()
    trace_tmp = "" if a.no_trace else str(out / "trace" / "current.h5")
    pg = get_group(a, trace_tmp, coll)
    trace_base = getattr(pg.config, "trace", "") if n > 1 else ""
    tracker = int(getattr(pg.config, "tracker_rank", 0))
    device = pick_device(a.device)
    if device.type == "cuda":  # the swarm and baseline copies must train to the same bits, as on the CPU
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    if not a.resume:  # a fresh run in a reused directory: stale checkpoints and traces must not mix in
        for p in (out / "ckpt").glob(f"round_*.rank{rank}.pt"):
            p.unlink(missing_ok=True)
        if rank == tracker:
            for p in (out / "trace").glob("round_*.h5"):
                p.unlink(missing_ok=True)
        coll.barrier()

    # data: identical test split everywhere, this peer's share of the training split
    data = load_digits(seed=a.data_seed, test_fraction=a.test_fraction)
    parts = partition(data.y_train, n, split_name(a), a.data_seed)
    hist = label_histogram(data.y_train, parts, data.n_classes)
    mine = torch.from_numpy(parts[rank])
    x_loc, y_loc = data.x_train[mine].to(device), data.y_train[mine].to(device)
    x_te, y_te = data.x_test.to(device), data.y_test.to(device)
    weight = float(len(parts[rank]))

    # models: the swarm's and each baseline's, from the same initial parameters
    names = ["swarm", *a.baselines]
    models = {k: make_model(data.n_features, a.hidden, data.n_classes, a.seed).to(device) for k in names}
    opts = {k: torch.optim.SGD(m.parameters(), lr=a.lr, momentum=a.momentum) for k, m in models.items()}
    n_params = sum(t.numel() for t in fl_tensors(models["swarm"]))
    payload_bytes = Layout.from_tensors(fl_tensors(models["swarm"])).total_bytes
    poisoned = set(range(a.poison)) if a.poison_ranks == "first" else set(range(n - a.poison, n))
    factor = a.poison_scale if a.poison_mode == "scale" else -1.0

    hist_rows: list[dict] = []
    start_round = 0
    if a.resume:
        start_round = newest_common_checkpoint(coll, out, a.rounds)
        if start_round:
            ck = torch.load(ckpt_path(out, start_round, rank), map_location="cpu", weights_only=True)
            diff = {k: (ck["args"].get(k), getattr(a, k)) for k in RESUME_KEYS if ck["args"].get(k) != getattr(a, k)}
            if diff or ck["world_size"] != n:
                raise SystemExit(
                    f"--resume: the checkpoint was made with other settings {diff} (world {ck['world_size']})"
                )
            for k in names:
                models[k].load_state_dict(ck["models"][k])
                opts[k].load_state_dict(ck["optimizers"][k])
            hist_rows = list(ck["history"])
            torch.set_rng_state(ck["torch_rng"])

    disp = Display(rank == 0 and not a.quiet, a.rounds, start_round, a.progress)
    if rank == 0 and not a.quiet:
        sizes = [len(p) for p in parts]
        disp.print(
            f"fltorrent FedAvg training: {n} peers, digits {split_name(a)} (samples per peer {sizes}, "
            f"test {len(data.y_test)}), MLP 64-{a.hidden}-10 ({n_params} parameters, {payload_bytes} B update), "
            f"rule {a.rule}, poison {f'{a.poison} ({a.poison_mode})' if a.poison else 'none'}, "
            f"baselines {a.baseline}, chunk {parse_bytes(a.chunk_bytes)} B, degree {a.degree}, "
            f"privacy {privacy_label(pg.config.privacy)}"
        )
        if start_round:
            disp.print(f"resumed from {ckpt_path(out, start_round, 0).parent} after round {start_round}")
        disp.print(f"run directory: {out}")
        disp.header()
        for r in hist_rows:
            disp.row(r, n)

    for rnd in range(start_round, a.rounds):
        row = run_round(rnd, a, coll, pg, models, opts, x_loc, y_loc, x_te, y_te, weight, poisoned, factor, device)
        if trace_base:
            coll.barrier()  # every rank has written its receive log of this round
            if rank == tracker:
                from fltorrent_hpc.trace import merge_round

                merge_round(trace_base, out=out / "trace" / f"round_{rnd + 1:03d}.h5")
        hist_rows.append(row)
        disp.row(row, n)
        done = rnd + 1
        if a.ckpt_every and (done % a.ckpt_every == 0 or done == a.rounds or done in (a.stop_after, a.kill_at)):
            state = {
                "round": done,
                "rank": rank,
                "world_size": n,
                "args": {k: v for k, v in vars(a).items()},
                "seeds": {
                    "seed": a.seed,
                    "data_seed": a.data_seed,
                    "next_round_data_order": round_seed(a.seed, rank, done),
                },
                "models": {k: m.state_dict() for k, m in models.items()},
                "optimizers": {k: o.state_dict() for k, o in opts.items()},
                "history": hist_rows,
                "torch_rng": torch.get_rng_state(),
            }
            save_checkpoint(out, done, rank, state)
            coll.barrier()  # every rank holds round `done` now: older files may go
            prune_checkpoints(out, rank, a.keep_ckpt)
        if a.kill_at and done == a.kill_at:
            disp.print(f"--kill-at {a.kill_at}: every rank kills itself (SIGKILL) after round {done}")
            disp.close()
            sys.stdout.flush()
            coll.barrier()
            os.kill(os.getpid(), signal.SIGKILL)
        if a.stop_after and done == a.stop_after:
            break
    disp.close()

    if trace_base:  # the per-round scratch files of the engine
        for p in (Path(trace_base), Path(f"{trace_base}.rank{rank}.h5")):
            if (p.name.endswith(f".rank{rank}.h5") or rank == tracker) and p.exists():
                p.unlink()
    summary = summarize(a, hist_rows, n, data, parts, hist, n_params, payload_bytes, poisoned, out)
    summary["wall_s"] = time.perf_counter() - t_start
    summary["final_params_sha"] = params_digest(models["swarm"])
    summary["final_params_sha_by_model"] = {k: params_digest(m) for k, m in models.items()}  # gossip: rank 0's
    if a.dump_params:  # every rank's final swarm parameters, raw bytes (compare launchers bit for bit)
        blob = b"".join(t.detach().cpu().contiguous().numpy().tobytes() for t in fl_tensors(models["swarm"]))
        Path(f"{a.dump_params}.rank{rank}.bin").write_bytes(blob)
    if rank == 0:
        jp = Path(a.json) if a.json else out / "summary.json"
        jp.parent.mkdir(parents=True, exist_ok=True)
        summary["outputs"]["json"] = str(jp)
        if not a.no_plot and hist_rows:
            pp = Path(a.png) if a.png else out / "curves.png"
            plot(summary, pp)
            summary["outputs"]["png"] = str(pp)
        jp.write_text(json.dumps(summary, indent=2))
        if not a.quiet:
            disp.print(final_lines(summary))
    coll.barrier()
    coll.free()
    summary["models"] = models  # for in-process callers (tests); not in the JSON
    return summary


def run_round(rnd, a, coll, pg, models, opts, x, y, x_te, y_te, weight, poisoned, factor, device) -> dict:
    rank, n = coll.rank, coll.size
    seed = round_seed(a.seed, rank, rnd)
    is_poisoned = rank in poisoned and a.poison > 0
    row: dict[str, Any] = {"round": rnd + 1}
    loss_sum = seen = 0.0
    t_train = t_comm = 0.0
    stats = None
    for name, model in models.items():
        tensors = fl_tensors(model)
        start = [t.detach().clone() for t in tensors]
        t0 = time.perf_counter()
        ls, sn = train_local(model, opts[name], x, y, a, seed)  # the same data order for every copy
        t1 = time.perf_counter()
        delta = None
        if a.rule != "fedavg":
            delta = agg.flat_update(tensors, start)
            if is_poisoned:
                delta = delta * factor
        elif is_poisoned:
            poison_(tensors, start, factor)
        if name == "swarm":
            loss_sum, seen, t_train = ls, sn, t1 - t0
            t2 = time.perf_counter()
            if a.rule == "fedavg":
                stats = swarm_fedavg(model, weight, start, a)
            else:
                stats = swarm_robust(pg, tensors, start, delta, weight, a)
            t_comm = time.perf_counter() - t2
        elif name == "central":
            central_aggregate(coll, model, start, delta, weight, a)
        else:  # gossip: publish the (possibly poisoned) parameters, mix with the overlay neighbours
            if a.rule != "fedavg":
                agg.apply_update_(tensors, start, delta)
            from fltorrent_hpc.swarm import build_overlay

            ov_cfg = SwarmConfig(degree=pg.config.degree, overlay=pg.config.overlay)  # the swarm's generator
            ov = build_overlay(n, ov_cfg, seed=round_seed(a.seed, 0x60551, rnd))
            gossip_mix(coll, model, ov)

    acc, tloss = evaluate(models["swarm"], x_te, y_te)
    loc = [
        loss_sum,
        seen,
        stats.bytes_sent,
        stats.bytes_recv,
        t_train + t_comm,
        t_train,
        t_comm,
        stats.warmup_s,
        stats.swarm_s,
        stats.round_s,
    ]
    sums = coll.allreduce(loc[:4], "sum")
    maxs = coll.allreduce(loc[4:], "max")
    row.update(
        accuracy=acc,
        test_loss=tloss,
        train_loss=float(sums[0] / max(sums[1], 1.0)),
        participants=stats.participants,
        bytes_moved=int(sums[2]),
        bytes_recv=int(sums[3]),
        round_s=float(maxs[0]),
        train_s=float(maxs[1]),
        comm_s=float(maxs[2]),
        warmup_s=float(maxs[3]),
        swarm_s=float(maxs[4]),
        engine_round_s=float(maxs[5]),
    )
    agree = [acc]
    if "central" in models:
        cacc, closs = evaluate(models["central"], x_te, y_te)
        ok = coll.allreduce([1.0 if same_params(models["swarm"], models["central"]) else 0.0], "min")[0]
        row.update(central_accuracy=cacc, central_test_loss=closs, bitexact=bool(ok))
        agree.append(cacc)
    if "gossip" in models:
        gacc, gloss = evaluate(models["gossip"], x_te, y_te)
        gsum = coll.allreduce([gacc, gloss], "sum")
        gmin = coll.allreduce([gacc], "min")
        row.update(gossip_accuracy=float(gsum[0] / n), gossip_test_loss=float(gsum[1] / n), gossip_min_accuracy=gmin[0])
    # every rank holds the same swarm model: check it (cheaply) instead of assuming it
    spread = coll.allreduce(agree, "max") - coll.allreduce(agree, "min")
    if spread.max() > 0:
        raise RuntimeError(f"round {rnd + 1}: ranks disagree on the averaged model's accuracy (spread {spread})")
    return row


# ----------------------------------------------------------------------------------------------- outputs


def params_digest(model: torch.nn.Module) -> str:
    import hashlib

    h = hashlib.sha256()
    for t in fl_tensors(model):
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def summarize(a, rows, n, data, parts, hist, n_params, payload_bytes, poisoned, out: Path) -> dict:
    def col(k):
        return [r.get(k) for r in rows]

    s: dict[str, Any] = {
        "rounds": len(rows),
        "final_accuracy": rows[-1]["accuracy"] if rows else None,
        "accuracy_by_round": col("accuracy"),
        "round_s_by_round": col("round_s"),
        "test_loss_by_round": col("test_loss"),
        "train_loss_by_round": col("train_loss"),
        "participants_by_round": col("participants"),
        "bytes_moved_by_round": col("bytes_moved"),
        "warmup_s_by_round": col("warmup_s"),
        "swarm_s_by_round": col("swarm_s"),
        "comm_s_by_round": col("comm_s"),
        "train_s_by_round": col("train_s"),
        "complete_rounds": sum(1 for r in rows if len(r["participants"]) == n),
        "world_size": n,
        "dataset": data.name,
        "split": split_name(a),
        "samples_per_peer": [int(len(p)) for p in parts],
        "label_histogram": hist.tolist(),
        "test_samples": int(len(data.y_test)),
        "model": f"MLP {data.n_features}-{a.hidden}-{data.n_classes}",
        "n_params": n_params,
        "update_bytes": payload_bytes,
        "rule": a.rule,
        "poisoned_ranks": sorted(poisoned) if a.poison else [],
        "baselines": a.baselines,
        "args": {k: v for k, v in vars(a).items() if k != "baselines"},
        "outputs": {
            "run_dir": str(out),
            "checkpoints": str(out / "ckpt"),
            "traces": str(out / "trace") if not a.no_trace and n > 1 else None,
        },
        "round_time_definition": "round_s = max over ranks of (local training + swarm round with aggregation)",
    }
    if "central" in a.baselines:
        s.update(
            baseline="central",
            baseline_final_accuracy=rows[-1]["central_accuracy"] if rows else None,
            baseline_accuracy_by_round=col("central_accuracy"),
            bitexact_rounds=sum(1 for r in rows if r.get("bitexact")),
            bitexact_by_round=col("bitexact"),
        )
    if "gossip" in a.baselines:
        s.update(
            gossip_final_accuracy=rows[-1]["gossip_accuracy"] if rows else None,
            gossip_accuracy_by_round=col("gossip_accuracy"),
            gossip_min_accuracy_by_round=col("gossip_min_accuracy"),
        )
        if "central" not in a.baselines:
            s.update(baseline="gossip", baseline_final_accuracy=s["gossip_final_accuracy"])
    return s


def plot(s: dict, path: Path) -> None:
    """Accuracy and round times by round.

    The swarm and central FedAvg curves coincide when the rounds are bit-exact, so the swarm is drawn as large
    hollow circles over small filled squares (both stay visible).  Round times use a log axis: round 1 carries
    one-off start-up costs and would otherwise flatten every later round.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    r = list(range(1, s["rounds"] + 1))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    if s.get("baseline_accuracy_by_round"):
        same = s.get("bitexact_rounds")
        note = f" ({same}/{s['rounds']} rounds bit-exact)" if same is not None else ""
        ax1.plot(r, s["baseline_accuracy_by_round"], "s--", ms=4, color="tab:orange", label="central FedAvg" + note)
    if s.get("gossip_accuracy_by_round"):
        ax1.plot(r, s["gossip_accuracy_by_round"], "^:", color="tab:green", label="gossip (mean over peers)")
    ax1.plot(
        r,
        s["accuracy_by_round"],
        "o-",
        ms=10,
        mfc="none",
        mew=1.5,
        lw=1.2,
        color="tab:blue",
        zorder=3,
        label=f"swarm ({s['rule']})",
    )
    ax1.set_xlabel("round")
    ax1.set_ylabel("test accuracy")
    ax1.set_title(f"{s['dataset']} {s['split']}, {s['world_size']} peers")
    ax1.grid(alpha=0.3)
    for ax in (ax1, ax2):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax1.legend()

    def positive(xs):  # a log axis cannot show 0 s (e.g. no warm-up without privacy): leave a gap
        return [x if x and x > 0 else float("nan") for x in xs]

    ax2.plot(r, positive(s["round_s_by_round"]), "o-", label="round (train + swarm)")
    ax2.plot(r, positive(s["comm_s_by_round"]), "s-", label="swarm round + aggregation")
    ax2.plot(r, positive(s["warmup_s_by_round"]), "^-", label="warm-up")
    ax2.set_yscale("log")
    ax2.set_xlabel("round")
    ax2.set_ylabel("seconds (max over ranks, log scale)")
    ax2.set_title("round 1 includes one-off start-up (compilation, first buffers)", fontsize=9)
    ax2.grid(alpha=0.3, which="both")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def final_lines(s: dict) -> str:
    lines = [f"final accuracy {s['final_accuracy']:.4f} after {s['rounds']} rounds ({s['rule']})"]
    if s.get("baseline") == "central":
        lines.append(
            f"central FedAvg {s['baseline_final_accuracy']:.4f}; bit-exact rounds {s['bitexact_rounds']}/{s['rounds']}"
        )
    if s.get("gossip_final_accuracy") is not None:
        lines.append(f"gossip {s['gossip_final_accuracy']:.4f} (mean over peers)")
    lines.append("outputs: " + ", ".join(f"{k} {v}" for k, v in s["outputs"].items() if v))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    s = train(a)
    return 0 if s["rounds"] and math.isfinite(s["final_accuracy"]) else 1


if __name__ == "__main__":
    sys.exit(main())
