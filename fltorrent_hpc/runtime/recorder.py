"""One trace recorder for simulated and real rounds: both write the same HDF5 schema (docs/TRACE.md).

The simulator records each stage as it runs (every transfer delivered, slot times); the real engine's
tracker records the stages it drove with what the peers reported delivered.  Either way the attack,
audit and report code reads one format.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..config import SwarmConfig
from ..swarm.round import Stage, SwarmRound
from ..trace import Trace


class RoundRecorder:
    """Builds the Trace of one round from the swarm core's stages."""

    def __init__(
        self,
        rnd: SwarmRound,
        cfg: SwarmConfig,
        source: str,
        update_bytes: int,
        *,
        seed: int,
        attrs: dict[str, Any] | None = None,
        peers: dict[str, np.ndarray] | None = None,
    ):
        self.rnd, self.C, self.nbytes = rnd, cfg.chunk_bytes, int(update_bytes)
        self.trace = tr = Trace()
        tr.attrs.update(
            source=source,
            n_peers=rnd.n,
            chunks_per_peer=rnd.K,
            chunk_bytes=cfg.chunk_bytes,
            cover_k=rnd.k,
            kappa=cfg.kappa,
            seed=seed,
            slot_seconds=cfg.slot_seconds,
            **(attrs or {}),
        )
        tr.peers = {**(peers or {}), "up_budget": rnd.up, "down_budget": rnd.down, "lag": rnd.lag}
        tr.edges = rnd.overlay.edges
        tr.overlay_attrs = {"kind": rnd.overlay.kind, "lambda2": float(rnd.overlay.lambda2)}

    def chunk_bytes(self, chunk: np.ndarray) -> np.ndarray:
        """Bytes of each chunk id (the last chunk of an update may be short)."""
        K = max(self.rnd.K, 1)
        i = chunk % K
        return np.minimum((i + 1) * self.C, self.nbytes) - i * self.C

    def stage(self, st: Stage, delivered: np.ndarray | None = None, t_start: float | None = None, t=None) -> None:
        """Record one stage; `delivered` (default: all) marks the transfers that arrived intact."""
        ok = np.ones(st.size, dtype=bool) if delivered is None else np.asarray(delivered, dtype=bool)
        tr, K = self.trace, max(self.rnd.K, 1)
        if st.size:
            times = {} if t is None else {"t": np.full(st.size, t), "t_start": np.full(st.size, t_start)}
            tr.add_transfers(
                stage=np.full(st.size, st.index),
                **times,
                sender=st.sender,
                receiver=st.receiver,
                owner=st.chunk // K,
                chunk=st.chunk,
                phase=st.kind,
                sender_owned=st.sender_owned,
                sender_buffer=st.sender_buffer,
                bytes=self.chunk_bytes(st.chunk),
                ok=ok,
            )
        moved = int(ok.sum())
        tr.add_stage(
            stage=[st.index],
            phase=[st.phase],
            transfers=[moved],
            capacity=[st.capacity],
            utilization=[moved / st.capacity if st.capacity else 0.0],
            maxflow=[st.maxflow],
        )
        if st.release_peer.size:
            tr.add_gate_releases(
                stage=np.full(st.release_peer.size, st.index), peer=st.release_peer, chunk=st.release_chunk
            )

    def finish(self, A: np.ndarray, agreed: np.ndarray, warmup_stages: int, stages: int) -> Trace:
        """The round's outcome: who stayed, who can rebuild what, what the peers agreed on."""
        rnd, tr = self.rnd, self.trace
        tr.attrs.update(warmup_stages=warmup_stages, stages=stages, warmup_failed_open=bool(rnd.warmup_failed_open))
        tr.peers.update(active=rnd.active[: rnd.n], left_at=rnd.left_at, complete_stage=rnd.complete_stage)
        tr.reconstructable = A
        tr.agreed = agreed
        return tr
