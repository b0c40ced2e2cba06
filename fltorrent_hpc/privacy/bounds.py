"""The paper's posterior bounds (PAPER.md §4.3-4.5) checked against what a round actually did.

Eq. 1 is checked on every warm-up transfer from the O_u, B_u the sender recorded when it sent.
Eq. 2 is evaluated per sender from the trace's own spray mass, lags and degree, next to the paper's
closed form.  Eq. 3-5 (collusion) are evaluated for a given coalition.  A transfer over a bound is
counted and returned, never dropped: the bounds are claims about the mechanism, the trace is evidence.

Owner chunks released by the gated-start rule (`/gate_releases`, DESIGN.md) break Eq. 1 on purpose (no
cover set exists yet without spray); they are counted as exceptions, separately from violations of
honest gating, and so are the transfers their senders made while holding a released chunk below k.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..trace import PHASE_SPRAY, PHASE_WARMUP, Trace, config_of
from .observations import adjacency_matrix, degrees, observation_window


def _kappa_k(trace: Trace) -> tuple[int, int]:
    cfg = config_of(trace)
    kappa = int(trace.attrs.get("kappa", cfg.get("kappa", 1)))
    k = int(trace.attrs.get("cover_k", 1))
    return kappa, max(k, 1)


def _gating_on(trace: Trace) -> bool:
    priv = str(config_of(trace).get("privacy", "full"))
    return priv == "full" or "gating" in priv.split(",")


@dataclass
class Eq1Check:
    """Eq. 1, O_u/B_u <= kappa/k, on every warm-up transfer."""

    cap: float
    gating: bool  # gating enabled in the round's config (without it the cap is not claimed)
    checked: int
    unchecked: int  # rows without a usable O_u/B_u (not recorded by the writer)
    max_ratio: float
    violations: int  # over the cap, not explained by a gate release
    violation_rows: np.ndarray
    throttle_violations: int  # O_u > kappa
    gate_releases: int  # owner chunks released below k by the gated-start rule (each an exception)
    gate_exception_transfers: int  # transfers over the cap made while the sender held a released chunk
    owner_sent: int  # warm-up transfers the owner itself sent
    expected_owner_sent: float  # sum of O_u/B_u: what origin-oblivious selection predicts
    open_transfers: int  # warm-up transfers by senders holding an eligible owner chunk (O_u > 0)
    open_owner_sent: int  # ... of which the sender's own chunk (origin-oblivious: about open_expected)
    open_expected: float

    @property
    def holds(self) -> bool:
        return self.violations == 0 and self.throttle_violations == 0


def check_eq1(trace: Trace) -> Eq1Check:
    """Check Eq. 1 on every warm-up (phase 1) transfer of `trace`."""
    kappa, k = _kappa_k(trace)
    tr = trace.transfers
    rows = np.flatnonzero(tr["phase"] == PHASE_WARMUP)
    o = tr["sender_owned"][rows].astype(np.int64)
    b = tr["sender_buffer"][rows].astype(np.int64)
    usable = (o >= 0) & (b > 0)
    rows, o, b = rows[usable], o[usable], b[usable]
    ratio = o / b
    over = o * k > kappa * b  # exact integer form of O/B > kappa/k
    throttle = o > kappa
    gr = trace.gate_releases
    first_release = np.full(trace.n_peers, np.iinfo(np.int64).max, dtype=np.int64)
    if gr["peer"].size:
        np.minimum.at(first_release, gr["peer"].astype(np.int64), gr["stage"].astype(np.int64))
    snd = tr["sender"][rows].astype(np.int64)
    released = first_release[snd] <= tr["stage"][rows]
    excused = over & ~throttle & released & (b < k)
    bad = (over & ~excused) | throttle
    own = tr["sender"][rows] == tr["owner"][rows]
    opened = o > 0
    return Eq1Check(
        cap=kappa / k,
        gating=_gating_on(trace),
        checked=int(rows.size),
        unchecked=int(usable.size - usable.sum()),
        max_ratio=float(ratio.max()) if ratio.size else float("nan"),
        violations=int((over & ~excused).sum()),
        violation_rows=rows[bad],
        throttle_violations=int(throttle.sum()),
        gate_releases=int(gr["peer"].size),
        gate_exception_transfers=int(excused.sum()),
        owner_sent=int(own.sum()),
        expected_owner_sent=float(ratio.sum()),
        open_transfers=int(opened.sum()),
        open_owner_sent=int(own[opened].sum()),
        open_expected=float(ratio[opened].sum()),
    )


@dataclass
class Eq2Eval:
    """Eq. 2 per sender u: kappa / (kappa + (1-eps) (Z_R(u) + q L_u)) from the trace's actual masses."""

    epsilon: float
    q: float
    kappa: int
    t_lag: int
    p_lead: float  # (T_lag-1)/(2 T_lag), 0 when lags are off
    sigma_sent: np.ndarray  # spray chunks each owner actually sent
    spray_received: np.ndarray  # Z_R(u): spray chunks u actually received
    mu: np.ndarray  # E[Z_R(u)] from the actual sigma_v and degrees (paper's formula)
    leaders: np.ndarray  # L_u: neighbours whose lag is smaller than u's (they start first)
    degree: np.ndarray
    bound: np.ndarray  # Eq. 2 with the actual Z_R(u) and L_u
    bound_expected: np.ndarray  # Eq. 2 with mu_u and |N(u)| p_lead q (the paper's form, per sender)
    bound_paper: float  # closed form with sigma = floor(R K) and the mean degree
    eta: np.ndarray  # failure probability of the expected form at this epsilon
    realized: np.ndarray  # max O_u/B_u over u's warm-up transfers with O_u > 0 (NaN: never sent own)
    violations: int  # warm-up transfers whose O_u/B_u exceeds the sender's actual-mass Eq. 2 bound
    violating_senders: int

    @property
    def max_bound(self) -> float:
        return float(np.max(self.bound)) if self.bound.size else float("nan")


def eval_eq2(trace: Trace, epsilon: float = 0.0, q: float = 1.0) -> Eq2Eval:
    """Evaluate Eq. 2 on `trace` (epsilon = 0 is the paper's worked example; q is the availability factor)."""
    if not (0.0 <= epsilon < 1.0 and 0.0 < q <= 1.0):
        raise ValueError("need 0 <= epsilon < 1 and 0 < q <= 1")
    cfg = config_of(trace)
    n = trace.n_peers
    kchunks = trace.chunks_per_peer
    kappa, _ = _kappa_k(trace)
    tr = trace.transfers
    deg = degrees(trace)
    sp = tr["phase"] == PHASE_SPRAY
    sigma_sent = np.bincount(tr["sender"][sp].astype(np.int64), minlength=n)
    z_r = np.bincount(tr["receiver"][sp].astype(np.int64), minlength=n)
    # mu_u = sum over v that may spray to u (u not in N(v) u {v}) of sigma_v / (n - 1 - |N(v)|)
    adj = adjacency_matrix(trace)
    pool = (n - 1 - deg).astype(np.float64)
    rate = np.divide(sigma_sent, pool, out=np.zeros(n), where=pool > 0)
    may = ~adj & ~np.eye(n, dtype=bool)  # may[v, u]: u is a spray candidate of v
    mu = rate @ may
    priv = str(cfg.get("privacy", "full"))
    lags_on = priv == "full" or "lags" in priv.split(",")
    t_lag = int(cfg.get("lag_slots", 1)) if lags_on else 1
    p_lead = (t_lag - 1) / (2 * t_lag)
    lag = np.asarray(trace.peers.get("lag", np.zeros(n)), dtype=np.int64)
    if lag.size != n:
        lag = np.zeros(n, dtype=np.int64)
    leaders = (adj & (lag[None, :] < lag[:, None])).sum(axis=1)
    bound = kappa / (kappa + (1 - epsilon) * (z_r + q * leaders))
    z_t = deg * p_lead * q
    bound_expected = kappa / (kappa + (1 - epsilon) * (mu + z_t))
    with np.errstate(divide="ignore", invalid="ignore"):
        eta = np.exp(-(epsilon**2) * mu / 2) + np.exp(-(epsilon**2) * z_t / 2)
    sigma_cfg = int(np.floor(float(cfg.get("spray_ratio", 0.0)) * kchunks)) if "spray" in priv or priv == "full" else 0
    m = float(deg.mean()) if n else 0.0
    bound_paper = kappa / (kappa + (1 - epsilon) * (sigma_cfg + m * p_lead * q))

    rows = np.flatnonzero(tr["phase"] == PHASE_WARMUP)
    o = tr["sender_owned"][rows].astype(np.int64)
    b = tr["sender_buffer"][rows].astype(np.int64)
    use = (o > 0) & (b > 0)
    snd = tr["sender"][rows][use].astype(np.int64)
    ratio = o[use] / b[use]
    realized = np.full(n, np.nan)
    if snd.size:
        tmp = np.full(n, -np.inf)
        np.maximum.at(tmp, snd, ratio)
        realized = np.where(np.isfinite(tmp), tmp, np.nan)
    over = ratio > bound[snd] * (1 + 1e-12)
    return Eq2Eval(
        epsilon=epsilon,
        q=q,
        kappa=kappa,
        t_lag=t_lag,
        p_lead=p_lead,
        sigma_sent=sigma_sent,
        spray_received=z_r,
        mu=mu,
        leaders=leaders,
        degree=deg,
        bound=bound,
        bound_expected=bound_expected,
        bound_paper=float(bound_paper),
        eta=eta,
        realized=realized,
        violations=int(over.sum()),
        violating_senders=int(np.unique(snd[over]).size),
    )


@dataclass
class CollusionEval:
    """Eq. 3-5 for one coalition at filtering strength phi (0: no filtering, 1: perfect erasure)."""

    phi: float
    rho: np.ndarray  # per sender: share of its received non-owner mass that came from coalition members
    theta_max: float  # max alliance-filtered posterior O/(O + (1 - phi rho) X) over observed transfers
    eq3_max: float  # max of the Eq. 3 right-hand side over observed transfers
    over_cap: int  # observed transfers whose filtered posterior exceeds kappa/k (the "cap" of Eq. 3)
    eq5_mean: float  # mean over observed honest senders of the Eq. 5 union bound (clipped to 1)
    owner_seen_rate: float  # empirical: fraction of those senders with >= 1 owner-sent transfer observed


def eval_collusion(trace: Trace, coalition: np.ndarray, phi: float = 1.0) -> CollusionEval:
    """Evaluate Eq. 3-5 for the warm-up transfers `coalition` receives from honest (non-member) senders."""
    if not 0.0 <= phi <= 1.0:
        raise ValueError("phi must be in [0, 1]")
    n = trace.n_peers
    kappa, k = _kappa_k(trace)
    tr = trace.transfers
    member = np.zeros(n, dtype=bool)
    member[np.asarray(coalition, dtype=np.int64)] = True
    win = observation_window(trace)
    end = win.end_stage
    gained = tr["ok"] & (tr["receiver"] != tr["owner"]) & (tr["stage"] < end)
    r = tr["receiver"][gained].astype(np.int64)
    from_c = member[tr["sender"][gained].astype(np.int64)]
    tot = np.bincount(r, minlength=n).astype(np.float64)
    coll = np.bincount(r, weights=from_c.astype(np.float64), minlength=n)
    rho = np.divide(coll, tot, out=np.zeros(n), where=tot > 0)

    rows = np.flatnonzero(win.mask & member[tr["receiver"]] & ~member[tr["sender"]])
    o = tr["sender_owned"][rows].astype(np.float64)
    b = tr["sender_buffer"][rows].astype(np.float64)
    use = (o >= 0) & (b > 0)
    rows, o, b = rows[use], o[use], b[use]
    snd = tr["sender"][rows].astype(np.int64)
    x_eff = (1 - phi * rho[snd]) * (b - o)
    theta = np.divide(o, o + x_eff, out=np.zeros_like(o), where=(o + x_eff) > 0)
    rhs = np.minimum(kappa / k, kappa / (kappa + x_eff))
    # Eq. 5: s_u draws from sender u, each bounded by its own (per-draw) Eq. 3 term
    s_u = np.bincount(snd, minlength=n)
    per = np.zeros(n)
    np.maximum.at(per, snd, rhs)
    seen = s_u > 0
    eq5 = np.minimum(1.0, s_u * per)
    owner_hit = np.zeros(n, dtype=bool)
    owner_hit[snd[tr["owner"][rows] == snd]] = True
    return CollusionEval(
        phi=phi,
        rho=rho,
        theta_max=float(theta.max()) if theta.size else float("nan"),
        eq3_max=float(rhs.max()) if rhs.size else float("nan"),
        over_cap=int((o * k > kappa * (o + x_eff) * (1 + 1e-12)).sum()),
        eq5_mean=float(eq5[seen].mean()) if seen.any() else float("nan"),
        owner_seen_rate=float(owner_hit[seen].mean()) if seen.any() else float("nan"),
    )
