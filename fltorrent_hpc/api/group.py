"""The "fltorrent" ProcessGroup: a thin torch.distributed group over the swarm engine and a Transport.

The group only validates, converts options, hands work to one communication thread and returns a Work
(work.py):

- dissemination-shaped collectives (all_gather*, broadcast, all_reduce, reduce) are swarm rounds of the
  engine: every rank publishes its tensor bytes, every rank receives all of them, reductions run locally in
  rank order (reductions.py), so every rank gets bit-identical results;
- the others (reduce_scatter, all_to_all, gather, scatter, barrier, send/recv) are direct point-to-point
  exchanges on the group's own transport contexts.

The transport is MPI under mpiexec/srun (an mpi4py communicator, wrapped in an MPITransport) and torch's gloo
point-to-point under torchrun (transport/torch_p2p.py); the group reaches either only through the Transport
interface.  Every wait is a test loop bounded by the group timeout (or the op's `opts.timeout`) and fails with
PeerTimeoutError naming the op and the peers still outstanding.  Before each collective the ranks agree
once on a fixed-width descriptor (wire.py: op, dtype, shape, root, reduce op and, for a swarm round, the
engine's round words), so a mismatch raises on every rank and the engine does not agree a second time.
Registration with torch is in registration.py.
"""

from __future__ import annotations

import atexit
import itertools
import queue
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from ..config import SwarmConfig, parse_privacy
from ..errors import (
    FLTorrentError,
    PeerTimeoutError,
    ShapeMismatchError,
    TransportError,
    TruncationError,
    UnsupportedError,
)
from ..swarm.rng import round_seed
from ..transport.base import ANY_SOURCE, Transport, Truncated
from ..transport.base import SPIN as _SPIN
from ..transport.base import pause as _pause
from . import wire
from .reductions import check_reduce, reduce_into, reduce_op
from .work import P2P, STOP, FLTorrentWork, Job, unset_timeout

BACKEND_NAME = "fltorrent"
TAG_LIMIT = 32767  # user tags are [0, TAG_LIMIT); monitored_barrier uses TAG_LIMIT itself (MPI's TAG_UB >= 32767)

# Set by tests (or by a user who brings an engine) to replace `fltorrent_hpc.runtime.engine.SwarmEngine`.
_engine_factory: Callable[..., Any] | None = None

_LIVE_GROUPS: weakref.WeakSet = weakref.WeakSet()


class FLTorrentProcessGroup(dist.ProcessGroup):
    """The "fltorrent" ProcessGroup: validate, convert options, queue for the comm thread, return a Work.

    `net` is the group's root Transport (the group closes it at shutdown) or an mpi4py communicator, which is
    wrapped in an MPITransport (freed at shutdown only when `owns_comm`: a sub-communicator the creator made).
    """

    def __init__(
        self,
        net: Any,
        *,
        timeout_s: float,
        config: SwarmConfig | None = None,
        global_ranks: Sequence[int] | None = None,
        name: str = "",
        owns_comm: bool = False,
    ) -> None:
        if not isinstance(net, Transport):  # an mpi4py communicator
            from ..transport.mpi import MPITransport

            net = MPITransport(net, name or "fltorrent", dup=False, owned=owns_comm)
        super().__init__(net.rank, net.size)
        self._rank, self._size = net.rank, net.size
        self._timeout_s = float(timeout_s)
        self._config = (config or SwarmConfig.from_env()).replace(timeout_s=float(timeout_s))
        self._global_ranks = list(global_ranks) if global_ranks is not None else list(range(self._size))
        self._label = name or "fltorrent"
        self._group_name = self._label
        self._group_desc = "fltorrent"
        self._net: Transport | None = net
        self._comm = getattr(net, "comm", None)  # the MPI communicator under an MPI transport, else None
        self._coll: Transport | None = net.dup("coll")  # agreement + direct collectives, tagged by sequence number
        self._p2p: Transport | None = net.dup("p2p")  # user send/recv with user tags
        self._engine = _make_engine(net, self._config) if self._size > 1 else None
        self._seq = itertools.count(1)
        self._submit_lock = threading.Lock()
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._inflight: list[P2P] = []
        self._graveyard: list = []  # requests abandoned after a timeout, kept alive with their buffers
        self._broken: BaseException | None = None  # set by a timeout: the ranks may no longer be in step
        self._state = "running"  # running -> closing -> closed | aborted
        self.last_round_stats: dict = {}
        self._plane: Any = None  # chunks/plane.TorchPlane of device rounds (device_plane), built on first use
        self._plane_why = ""  # why device rounds stage through the host here, when they do
        self._thread = threading.Thread(target=self._loop, name=f"fltorrent-comm-{self._label}", daemon=True)
        self._thread.start()
        _LIVE_GROUPS.add(self)

    # ----------------------------------------------------------------- identity

    def getBackendName(self) -> str:  # noqa: N802 (torch's name)
        return BACKEND_NAME

    def name(self) -> str:
        return BACKEND_NAME

    # The C++ name accessors read the registered backends, which a Python group does not have (DeviceMesh,
    # functional collectives and DTensor need `group_name`).
    def _set_group_name(self, name: str) -> None:
        self._group_name = str(name)

    @property
    def group_name(self) -> str:
        return self._group_name

    def _set_group_desc(self, desc: str) -> None:
        self._group_desc = str(desc)

    @property
    def group_desc(self) -> str:
        return self._group_desc

    @property
    def config(self) -> SwarmConfig:
        return self._config

    @property
    def timeout_s(self) -> float:
        return self._timeout_s

    def __repr__(self) -> str:
        return f"FLTorrentProcessGroup(rank={self._rank}, size={self._size}, ranks={self._global_ranks})"

    # ----------------------------------------------------------------- comm thread

    def _loop(self) -> None:
        """Run queued jobs in order; between them, drive in-flight send/recv (yield first, then back off)."""
        idle = 0
        while True:
            try:
                if not self._inflight:
                    item = self._q.get()
                elif idle <= _SPIN:
                    item = self._q.get_nowait()
                else:
                    item = self._q.get(timeout=min(2e-3, 1e-5 * 2 ** min(idle - _SPIN, 8)))
            except queue.Empty:
                item = None
            if item is STOP:
                break
            if item is not None:
                self._run_job(item)
            if self._progress_p2p() or item is not None:
                idle = 0
            elif self._inflight:
                idle += 1
                if idle <= _SPIN:
                    time.sleep(0)
        self._fail_inflight(FLTorrentError(f"fltorrent group {self._label} was shut down"))

    def _run_job(self, job: Job) -> None:
        if self._state == "aborted":
            if job.work is not None:
                job.work._finish(FLTorrentError(f"fltorrent {job.name}: the group was aborted"))
            return
        try:
            job.run(time.monotonic() + job.timeout_s)
            if job.work is not None:
                job.work._finish()
        except BaseException as e:  # noqa: BLE001 - every failure must reach the waiting caller
            if isinstance(e, PeerTimeoutError):
                self._broken = e  # a peer may still be inside this op: later ops could pair up wrongly
            if job.work is not None:
                job.work._finish(e)

    def _progress_p2p(self) -> bool:
        if not self._inflight:
            return False
        net = self._p2p
        now = time.monotonic()
        progressed, keep = False, []
        got = set(net.test([op.req for op in self._inflight]))
        for i, op in enumerate(self._inflight):
            if i in got:
                progressed = True
                why = net.failed(op.req)
                if why:
                    op.work._finish(_p2p_error(op, why))
                    continue
                try:
                    if op.done_cb is not None:
                        op.done_cb(op.req)
                    op.work._finish()
                except BaseException as e:  # noqa: BLE001
                    op.work._finish(e)
            elif now > op.deadline:
                progressed = True
                if op.what.startswith("recv"):
                    self._cancel(net, [op.req])
                else:
                    self._graveyard.append((op.req, op.keep))
                op.work._finish(
                    PeerTimeoutError(f"fltorrent {op.what}: peer rank {op.peer} did not complete it in time")
                )
            else:
                keep.append(op)
        self._inflight = keep
        return progressed

    def _fail_inflight(self, exc: BaseException) -> None:
        for op in self._inflight:
            if op.what.startswith("recv"):
                self._cancel(self._p2p, [op.req])
            else:
                self._graveyard.append((op.req, op.keep))
            op.work._finish(exc)
        self._inflight = []

    def _wait_reqs(
        self,
        net: Transport,
        reqs: list,
        peers: list,
        deadline: float,
        what: str,
        recv_mask: Sequence[bool] = (),
        keep: Any = None,
        pending_out: list | None = None,
    ) -> None:
        """Test loop over `net`'s requests with a deadline; keeps user p2p moving meanwhile.

        On timeout, pending receives are cancelled (so they cannot match a later message); other requests and
        their buffers are parked for good, since the transport may still touch them.  `pending_out` receives the
        peers still outstanding.  A request that completed with an error raises TransportError.
        """
        done = np.zeros(len(reqs), dtype=bool)
        idle = 0
        while not done.all():
            live = np.flatnonzero(~done)
            got = net.test([reqs[i] for i in live])
            if got:
                done[live[got]] = True
                idle = 0
                continue
            if time.monotonic() > deadline:
                waiting = sorted({peers[i] for i in live}, key=str)
                if pending_out is not None:
                    pending_out.extend(peers[i] for i in live)
                recvs = [reqs[i] for i in live if i < len(recv_mask) and recv_mask[i]]
                self._graveyard.extend((reqs[i], keep) for i in live if not (i < len(recv_mask) and recv_mask[i]))
                self._cancel(net, recvs)
                err = PeerTimeoutError(f"fltorrent {what}: still waiting on rank(s) {waiting} at the deadline")
                self._broken = err
                raise err
            if self._inflight:
                self._progress_p2p()
            idle += 1
            _pause(idle)
        why = [w for w in (net.failed(r) for r in reqs) if w]
        if why:
            raise TransportError(f"fltorrent {what}: {why[0]}")

    def _cancel(self, net: Transport | None, reqs: list) -> None:
        """Cancel pending receives (on failure paths; a transport that cannot keeps them in the graveyard)."""
        if not reqs or net is None:
            return
        try:
            net.cancel(reqs)
        except Exception:  # noqa: BLE001 - best effort: keep them referenced instead
            self._graveyard.extend((r, None) for r in reqs)

    # ----------------------------------------------------------------- submission

    def _check_usable(self, name: str) -> None:
        if self._state != "running":
            raise FLTorrentError(f"fltorrent {name}: the group is {self._state}")
        if self._broken is not None:
            raise FLTorrentError(
                f"fltorrent {name}: the group failed earlier ({self._broken}); ranks may be out of step, so "
                "destroy it and build a new one"
            )

    def _timeout_of(self, opts: Any) -> float:
        td = getattr(opts, "timeout", None)
        return self._timeout_s if unset_timeout(td) else td.total_seconds()

    def _submit(
        self,
        name: str,
        run: Callable[[float], None],
        outputs: list,
        timeout_s: float,
        devices: Sequence[torch.device] = (),
    ) -> FLTorrentWork:
        self._check_usable(name)
        work = FLTorrentWork(name, outputs, devices, limit_s=2 * timeout_s + 60.0)
        self._q.put(Job(name, run, work, timeout_s))
        return work

    def _collective(self, name: str, build: Callable[[], _Plan], opts: Any) -> FLTorrentWork:
        """Run `build` (local validation) now; queue agreement + the op; on a local error tell the peers."""
        timeout_s = self._timeout_of(opts)
        with self._submit_lock:
            seq = next(self._seq)
            try:
                plan = build()
            except Exception as local_error:
                reject = wire.meta(seq, name, rejected=True)
                self._q.put(Job(name, lambda dl: self._agree(reject, seq, name, dl), None, timeout_s))
                raise local_error
            meta = plan.meta
            meta[1] = seq

            def job(deadline: float) -> None:
                if plan.round is not None:  # on the comm thread: the engine's next round id is this op's
                    meta[wire.OP_W :] = self._round_words(plan.round)
                self._agree(meta, seq, name, deadline)
                plan.run(deadline, seq)

            return self._submit(name, job, plan.outputs, timeout_s, plan.devices)

    def _round_words(self, rnd: _Round) -> np.ndarray:
        """The engine's round_meta for the round `rnd` is about to run (-1s in a group of one: no engine)."""
        if self._engine is None:
            return np.full(len(wire.ROUND_FIELDS), -1, dtype=np.int64)
        cfg = None if rnd.privacy is None else self._engine.cfg.replace(privacy=parse_privacy(rnd.privacy))
        words = np.asarray(
            self._engine.round_meta(_nbytes(rnd.payload), cfg, rnd.consensus, self._engine.round_id), dtype=np.int64
        )
        if words.size != len(wire.ROUND_FIELDS):
            raise FLTorrentError(
                f"the engine's round_meta has {words.size} words; wire.ROUND_FIELDS names {len(wire.ROUND_FIELDS)}"
            )
        return words

    def _agree(self, meta: np.ndarray, seq: int, name: str, deadline: float) -> None:
        """Every rank compares every rank's descriptor; any difference raises on every rank."""
        if self._size == 1:
            if meta[3]:
                raise FLTorrentError(f"fltorrent {name} #{seq}: rejected locally")
            return
        allm = np.empty((self._size, wire.META_W), dtype=np.int64)
        req = self._coll.post_allgather(meta, allm)
        self._wait_reqs(self._coll, [req], ["all"], deadline, f"{name} #{seq} agreement", keep=(meta, allm))
        rejected = [r for r in range(self._size) if allm[r, 3]]
        if rejected:
            raise FLTorrentError(
                f"fltorrent {name} #{seq}: rank(s) {rejected} rejected their arguments (see the error on those ranks)"
            )
        bad = [r for r in range(self._size) if not np.array_equal(allm[r], allm[0])]
        if bad:
            r = bad[0]
            diffs = wire.differences(allm[0], allm[r], 0, r)
            raise ShapeMismatchError(
                f"fltorrent {name} #{seq}: ranks {bad} disagree with rank 0 ({'; '.join(diffs)}); every rank must "
                "call the same collective with the same shapes, dtypes, root and op (and swarm settings)"
            )

    # ----------------------------------------------------------------- dissemination

    def _disseminate(self, rnd: _Round, seq: int, deadline: float, *, partial_ok: bool = False, what: str = "round"):
        """One swarm round (comm thread only, already agreed in `_collective`); unless partial_ok, every rank
        must be reconstructed.

        The swarm deadline is the caller's `deadline_s` (else the config's `deadline_s`, else none), capped by
        the time left before this op's own deadline (job start + the op's timeout): a round never runs past the
        op, and ranks not reconstructed by then are left out of A instead of failing a later wait.
        """
        swarm_deadline = swarm_deadline_s(rnd.deadline_s, self._config.deadline_s, deadline - time.monotonic())
        if self._size == 1:
            res = _LocalRound(rnd.payload, rnd.weight)
            if rnd.out is not None:
                rnd.out[0][:] = rnd.payload
        else:
            if rnd.plane is not None and rnd.plane.data is None:  # first device round: collective, agreed on
                from ..transport.nccl import NcclDataTransport

                rnd.plane.data = NcclDataTransport.bootstrap(self._coll, rnd.plane.device, self._timeout_s)
            res = self._engine.disseminate(
                rnd.payload,
                plane=rnd.plane,
                sink=rnd.sink,
                weight=rnd.weight,
                privacy=rnd.privacy,
                seed=round_seed(self._config.seed, seq),
                deadline_s=swarm_deadline,
                consensus=rnd.consensus,
                out=rnd.out,
                agreed=True,
            )
        self.last_round_stats = dict(getattr(res, "stats", {}) or {})
        if not partial_ok:
            missing = [r for r in range(self._size) if res.updates[r] is None]
            if missing:
                raise PeerTimeoutError(
                    f"fltorrent {what} #{seq}: updates of rank(s) {missing} were not reconstructed by the deadline"
                )
        return res

    def swarm_round(
        self,
        payload: np.ndarray | torch.Tensor,
        *,
        weight: float = 1.0,
        privacy: Any = None,
        deadline_s: float | None = None,
        timeout_s: float | None = None,
        digest: int = 0,
        reject: BaseException | None = None,
        consume: Callable[[Any], Any] | None = None,
        plane: Any = None,
        sink: Any = None,
    ) -> Any:
        """One FL round on the comm thread (used by fedavg_, aggregate_): blocks; returns consume(RoundResult) or
        the result.

        Ranks first agree on the payload size, `digest` (e.g. a layout hash) and the engine's round words, so a
        mismatch raises everywhere.  privacy None: the group config's; deadline_s: see `_disseminate`; consensus:
        the group config's `consensus` (False = each rank's own reconstructable set, the paper's semantics).
        `reject`: this rank's own argument error; it is raised here after the peers were told, so they raise too.
        `consume` runs on the comm thread before the next op, while the engine's update buffers are still valid.
        `plane`: `device_plane(...)` for a uint8 device `payload` (the rows stay on the device), None for host bytes;
        the caller folds which into `digest`, so ranks that disagree raise instead of waiting on another transport.
        `sink` (chunks/plane.RunAccumulator): fed every verified chunk run during the round.
        """
        if plane is None:
            payload = np.ascontiguousarray(payload).reshape(-1).view(np.uint8)
        box: list = []
        timeout_s = self._timeout_s if timeout_s is None else timeout_s

        def build():
            if reject is not None:
                raise reject
            mechanisms = None if privacy is None else parse_privacy(privacy)  # a bad value: the reject path
            meta = wire.meta(0, "swarm_round", numel=_nbytes(payload), crc=int(digest) & 0x7FFFFFFFFFFFFFFF)
            rnd = _Round(payload, weight, mechanisms, deadline_s, self._config.consensus, plane=plane, sink=sink)

            def run(deadline, seq):
                res = self._disseminate(rnd, seq, deadline, partial_ok=True, what="swarm_round")
                box.append(consume(res) if consume is not None else res)

            return _Plan(meta, run, [], (), rnd)

        self._collective("swarm_round", build, _Opts(timeout_s)).wait()
        return box[0]

    # ----------------------------------------------------------------- all_reduce / reduce

    def allreduce(self, tensors: list[torch.Tensor], opts: Any = None) -> FLTorrentWork:
        return self._allreduce("allreduce", tensors, opts)

    def allreduce_coalesced(self, tensors: list[torch.Tensor], opts: Any = None) -> FLTorrentWork:
        return self._allreduce("allreduce_coalesced", tensors, opts)

    def _allreduce(self, name: str, tensors: list[torch.Tensor], opts: Any, root: int = -1) -> FLTorrentWork:
        opts = dist.AllreduceOptions() if opts is None else opts

        def build():
            ts = list(tensors)
            if name in ("allreduce", "reduce"):
                wire.one(ts, name)
            if not ts:
                raise UnsupportedError(f"{name}: no tensors")
            kind, factor = reduce_op(opts)
            for t in ts:
                wire.check_tensor(t, name)
                check_reduce(kind, factor, t.dtype, name)
            if root >= self._size or root < -1:
                raise UnsupportedError(f"{name}: root {root} out of range for a group of {self._size}")
            payload, offs = wire.pack(ts)
            meta = wire.meta_tensors(name, ts, root=root, redop=int(kind))
            shapes = [(t.dtype, tuple(t.shape), wire.nbytes(t)) for t in ts]
            rnd = _Round(payload)

            def run(deadline, seq):
                res = self._disseminate(rnd, seq, deadline, what=name)
                if root >= 0 and self._rank != root:
                    return
                for t, off, (dt, shape, nb) in zip(ts, offs, shapes):
                    parts = [wire.from_bytes(res.updates[r][off : off + nb], dt, shape) for r in range(self._size)]
                    acc = torch.empty(shape, dtype=dt)
                    wire.write(t, reduce_into(acc, parts, kind, factor, self._size))

            return _Plan(meta, run, ts, wire.devices_of(ts), rnd)

        return self._collective(name, build, opts)

    def reduce(self, tensors: list[torch.Tensor], opts: Any = None) -> FLTorrentWork:
        opts = dist.ReduceOptions() if opts is None else opts
        return self._allreduce("reduce", tensors, opts, root=int(opts.rootRank))

    # ----------------------------------------------------------------- all_gather family

    def allgather(
        self, output_tensors: list[list[torch.Tensor]], input_tensors: list[torch.Tensor], opts: Any = None
    ) -> FLTorrentWork:
        def build():
            inp = wire.one(input_tensors, "allgather")
            if len(output_tensors) != 1:
                raise UnsupportedError(f"allgather: expected one output list, got {len(output_tensors)}")
            outs = list(output_tensors[0])
            self._check_outputs("allgather", outs, inp)
            return self._gather_like("allgather", [inp], [outs])

        return self._collective("allgather", build, opts)

    def allgather_coalesced(
        self, output_lists: list[list[torch.Tensor]], input_list: list[torch.Tensor], opts: Any = None
    ) -> FLTorrentWork:
        """output_lists[r][j] receives rank r's input j (gloo's layout), all in one swarm round."""

        def build():
            ins = [wire.check_tensor(t, "allgather_coalesced") for t in input_list]
            if len(output_lists) != self._size or any(len(o) != len(ins) for o in output_lists):
                raise UnsupportedError(
                    f"allgather_coalesced: need {self._size} output lists of {len(ins)} tensors (one list per rank)"
                )
            outs = [[output_lists[r][j] for r in range(self._size)] for j in range(len(ins))]
            for o, i in zip(outs, ins):
                self._check_outputs("allgather_coalesced", o, i)
            return self._gather_like("allgather_coalesced", ins, outs)

        return self._collective("allgather_coalesced", build, opts)

    def all_gather_single(self, output: torch.Tensor, input: torch.Tensor, opts: Any = None) -> FLTorrentWork:  # noqa: A002
        def build():
            self._check_flat("all_gather_single", output, input, self._size)
            return self._gather_like("all_gather_single", [input], [self._split_flat(output, input)], flat=[output])

        return self._collective("all_gather_single", build, opts)

    _allgather_base = all_gather_single

    def all_gather_single_coalesced(
        self, outputs: list[torch.Tensor], inputs: list[torch.Tensor], opts: Any = None
    ) -> FLTorrentWork:
        name = "all_gather_single_coalesced"

        def build():
            if len(outputs) != len(inputs) or not inputs:
                raise UnsupportedError(f"{name}: {len(outputs)} outputs for {len(inputs)} inputs")
            for o, i in zip(outputs, inputs):
                self._check_flat(name, o, i, self._size)
            outs = [self._split_flat(o, i) for o, i in zip(outputs, inputs)]
            return self._gather_like(name, list(inputs), outs, flat=list(outputs))

        return self._collective(name, build, opts)

    allgather_into_tensor_coalesced = all_gather_single_coalesced

    def _check_outputs(self, name: str, outs: list[torch.Tensor], inp: torch.Tensor) -> None:
        if len(outs) != self._size:
            raise UnsupportedError(f"{name}: output list has {len(outs)} tensors for a group of {self._size}")
        for o in outs:
            wire.check_tensor(o, name)
            if o.dtype != inp.dtype or o.numel() != inp.numel():
                raise ShapeMismatchError(
                    f"{name}: output {tuple(o.shape)}/{o.dtype} does not match input {tuple(inp.shape)}/{inp.dtype}"
                )

    def _check_flat(self, name: str, out: torch.Tensor, inp: torch.Tensor, n: int) -> None:
        wire.check_tensor(out, name)
        wire.check_tensor(inp, name)
        if out.dtype != inp.dtype or out.numel() != n * inp.numel():
            raise ShapeMismatchError(
                f"{name}: output {tuple(out.shape)}/{out.dtype} must hold {n} x input {tuple(inp.shape)}/{inp.dtype}"
            )

    def _split_flat(self, out: torch.Tensor, inp: torch.Tensor) -> list[torch.Tensor]:
        """Per-rank slices of a flat output (views when it is a contiguous CPU tensor)."""
        if out.device.type == "cpu" and out.is_contiguous():
            flat = out.view(-1)
        else:
            flat = torch.empty(out.numel(), dtype=out.dtype)
        n = inp.numel()
        return [flat[r * n : (r + 1) * n] for r in range(self._size)]

    def _gather_like(
        self, name: str, ins: list[torch.Tensor], outs: list[list[torch.Tensor]], flat: list[torch.Tensor] | None = None
    ):
        payload, offs = wire.pack(ins)
        meta = wire.meta_tensors(name, ins)
        shapes = [(t.dtype, wire.nbytes(t)) for t in ins]
        result = flat if flat is not None else (outs[0] if len(outs) == 1 else [o for lst in outs for o in lst])

        # one input whose outputs are CPU-contiguous: the engine receives straight into them (no second full copy)
        direct = len(ins) == 1 and all(
            o.device.type == "cpu" and o.is_contiguous() and not (o.is_conj() or o.is_neg()) for o in outs[0]
        )
        rnd = _Round(payload, out=[wire.host_view(o) for o in outs[0]] if direct else None)

        def run(deadline, seq):
            res = self._disseminate(rnd, seq, deadline, what=name)
            for k, (dt, nb) in enumerate(shapes):
                if not direct:  # staged: copy each rank's bytes out of the engine's buffers
                    for r in range(self._size):
                        o = outs[k][r]
                        wire.write(o, wire.from_bytes(res.updates[r][offs[k] : offs[k] + nb], dt, o.shape))
                if flat is not None:
                    base = outs[k][0]
                    if flat[k].device.type != "cpu" or not flat[k].is_contiguous():
                        wire.write(flat[k], base._base if base._base is not None else torch.cat(outs[k]))

        return _Plan(meta, run, result, wire.devices_of([*ins, *(flat or [])]), rnd)

    # ----------------------------------------------------------------- broadcast

    def broadcast(self, tensors: list[torch.Tensor], opts: Any = None) -> FLTorrentWork:
        if isinstance(opts, int):
            root, opts = opts, dist.BroadcastOptions()
        else:
            opts = dist.BroadcastOptions() if opts is None else opts
            root = int(opts.rootRank)

        def build():
            t = wire.one(tensors, "broadcast")
            if not 0 <= root < self._size:
                raise UnsupportedError(f"broadcast: root {root} out of range for a group of {self._size}")
            payload = wire.host_bytes(t)
            meta = wire.meta_tensors("broadcast", [t], root=root)
            rnd = _Round(payload)

            def run(deadline, seq):
                res = self._disseminate(rnd, seq, deadline, what="broadcast")
                if self._rank != root:
                    wire.write(t, wire.from_bytes(res.updates[root], t.dtype, t.shape))

            return _Plan(meta, run, [t], wire.devices_of([t]), rnd)

        return self._collective("broadcast", build, opts)

    # ----------------------------------------------------------------- direct (point-to-point) collectives

    def _exchange(
        self, sends: dict[int, np.ndarray], recvs: dict[int, np.ndarray], tag: int, deadline: float, what: str
    ) -> None:
        """Post every receive, then every send, on the collective context; bounded wait on all."""
        reqs, peers = [], []
        for peer, buf in recvs.items():
            reqs.append(self._coll.post_recv(buf, peer, tag))
            peers.append(peer)
        for peer, buf in sends.items():
            reqs.append(self._coll.post_send(buf, peer, tag))
            peers.append(peer)
        self._wait_reqs(self._coll, reqs, peers, deadline, what, [True] * len(recvs), (sends, recvs))

    def _tag(self, seq: int) -> int:
        return seq % TAG_LIMIT

    def reduce_scatter(
        self, output_tensors: list[torch.Tensor], input_tensors: list[list[torch.Tensor]], opts: Any = None
    ) -> FLTorrentWork:
        opts = dist.ReduceScatterOptions() if opts is None else opts

        def build():
            out = wire.one(output_tensors, "reduce_scatter")
            if len(input_tensors) != 1 or len(input_tensors[0]) != self._size:
                raise UnsupportedError(f"reduce_scatter: need one input list of {self._size} tensors")
            ins = list(input_tensors[0])
            self._check_outputs("reduce_scatter", ins, out)
            return self._reduce_scatter("reduce_scatter", out, [wire.host_bytes(t) for t in ins], opts)

        return self._collective("reduce_scatter", build, opts)

    def reduce_scatter_single(self, output: torch.Tensor, input: torch.Tensor, opts: Any = None) -> FLTorrentWork:  # noqa: A002
        opts = dist.ReduceScatterOptions() if opts is None else opts

        def build():
            self._check_flat("reduce_scatter_single", input, output, self._size)
            b = wire.host_bytes(input)
            nb = wire.nbytes(output)
            return self._reduce_scatter(
                "reduce_scatter_single", output, [b[r * nb : (r + 1) * nb] for r in range(self._size)], opts
            )

        return self._collective("reduce_scatter_single", build, opts)

    _reduce_scatter_base = reduce_scatter_single

    def reduce_scatter_single_coalesced(
        self, outputs: list[torch.Tensor], inputs: list[torch.Tensor], opts: Any = None
    ) -> FLTorrentWork:
        """Loop of reduce_scatter_single, completed by one Work."""
        opts = dist.ReduceScatterOptions() if opts is None else opts
        if len(outputs) != len(inputs) or not inputs:
            raise UnsupportedError(f"reduce_scatter_single_coalesced: {len(outputs)} outputs for {len(inputs)} inputs")
        works = [self.reduce_scatter_single(o, i, opts) for o, i in zip(outputs, inputs)]
        return self._chain("reduce_scatter_single_coalesced", works, list(outputs), opts)

    reduce_scatter_tensor_coalesced = reduce_scatter_single_coalesced

    def _chain(self, name: str, works: list[FLTorrentWork], outputs: list, opts: Any) -> FLTorrentWork:
        """A Work completing after `works` (queued behind them on the same comm thread)."""

        def run(deadline):
            for w in works:
                if w.exception() is not None:
                    raise w.exception()

        return self._submit(name, run, outputs, self._timeout_of(opts), wire.devices_of(outputs))

    def _reduce_scatter(self, name: str, out: torch.Tensor, pieces: list[np.ndarray], opts: Any):
        kind, factor = reduce_op(opts)
        check_reduce(kind, factor, out.dtype, name)
        meta = wire.meta_tensors(name, [out], redop=int(kind))
        nb = wire.nbytes(out)

        def run(deadline, seq):
            recv = np.empty((self._size, nb), dtype=np.uint8)
            recv[self._rank] = pieces[self._rank]
            others = [r for r in range(self._size) if r != self._rank]
            if nb:
                self._exchange(
                    {r: pieces[r] for r in others},
                    {r: recv[r] for r in others},
                    self._tag(seq),
                    deadline,
                    f"{name} #{seq}",
                )
            parts = [wire.from_bytes(recv[r], out.dtype, out.shape) for r in range(self._size)]
            wire.write(out, reduce_into(torch.empty(out.shape, dtype=out.dtype), parts, kind, factor, self._size))

        return _Plan(meta, run, [out], wire.devices_of([out]))

    def alltoall(
        self, output_tensors: list[torch.Tensor], input_tensors: list[torch.Tensor], opts: Any = None
    ) -> FLTorrentWork:
        def build():
            if len(output_tensors) != self._size or len(input_tensors) != self._size:
                raise UnsupportedError(f"alltoall: need {self._size} input and output tensors")
            ins = [wire.check_tensor(t, "alltoall") for t in input_tensors]
            outs = [wire.check_tensor(t, "alltoall") for t in output_tensors]
            dt = ins[0].dtype
            if any(t.dtype != dt for t in [*ins, *outs]):
                raise ShapeMismatchError("alltoall: all tensors must share one dtype")
            send = [wire.host_bytes(t) for t in ins]
            sizes = np.array([t.numel() for t in ins] + [t.numel() for t in outs], dtype=np.int64)
            return self._alltoall("alltoall", send, outs, None, sizes, dt)

        return self._collective("alltoall", build, opts)

    def all_to_all_single(
        self,
        output: torch.Tensor,
        input: torch.Tensor,  # noqa: A002
        output_split_sizes: Sequence[int] | None = None,
        input_split_sizes: Sequence[int] | None = None,
        opts: Any = None,
    ) -> FLTorrentWork:
        def build():
            wire.check_tensor(output, "all_to_all_single")
            wire.check_tensor(input, "all_to_all_single")
            if output.dtype != input.dtype:
                raise ShapeMismatchError("all_to_all_single: input and output dtypes differ")
            n = self._size
            ins = wire.splits(input, input_split_sizes, n, "input")
            outs = wire.splits(output, output_split_sizes, n, "output")
            if input.dim() == 0 or output.dim() == 0:
                raise UnsupportedError("all_to_all_single: tensors need at least one dimension")
            if input.shape[1:] != output.shape[1:]:
                raise ShapeMismatchError("all_to_all_single: input and output differ beyond dim 0")
            row = int(np.prod(input.shape[1:], dtype=np.int64))
            flat_in = wire.host_bytes(input)
            esz = input.element_size() * row
            offs = np.concatenate([[0], np.cumsum(ins)])
            send = [flat_in[offs[r] * esz : offs[r + 1] * esz] for r in range(n)]
            if output.device.type == "cpu" and output.is_contiguous():
                ov = output
            else:
                ov = torch.empty(output.shape, dtype=output.dtype)
            oo = np.concatenate([[0], np.cumsum(outs)])
            views = [ov[oo[r] : oo[r + 1]] for r in range(n)]
            sizes = np.array([int(s) * row for s in ins] + [int(s) * row for s in outs], dtype=np.int64)
            return self._alltoall("all_to_all_single", send, views, (output, ov), sizes, input.dtype)

        return self._collective("all_to_all_single", build, opts)

    alltoall_base = all_to_all_single

    def _alltoall(self, name, send, outs, final, sizes, dtype):
        meta = wire.meta(0, name, dtype=wire.DTYPE_CODE[dtype], numel=self._size)
        n = self._size

        def run(deadline, seq):
            # every rank checks the whole split matrix: what r sends to s must be what s expects from r
            allsz = np.empty((n, 2 * n), dtype=np.int64)
            if n > 1:
                req = self._coll.post_allgather(sizes, allsz)
                what = f"{name} #{seq} split agreement"
                self._wait_reqs(self._coll, [req], ["all"], deadline, what, keep=(sizes, allsz))
            else:
                allsz[0] = sizes
            bad = [(r, s) for r in range(n) for s in range(n) if allsz[r, s] != allsz[s, n + r]]
            if bad:
                r, s = bad[0]
                raise ShapeMismatchError(
                    f"fltorrent {name} #{seq}: rank {r} sends {allsz[r, s]} elements to rank {s}, which expects "
                    f"{allsz[s, n + r]}"
                )
            recv = {r: np.empty(wire.nbytes(outs[r]), dtype=np.uint8) for r in range(n) if r != self._rank}
            sendd = {r: send[r] for r in range(n) if r != self._rank and send[r].size}
            recv = {r: b for r, b in recv.items() if b.size}
            self._exchange(sendd, recv, self._tag(seq), deadline, f"{name} #{seq}")
            for r in range(n):
                o = outs[r]
                src = send[r] if r == self._rank else recv.get(r, np.zeros(0, dtype=np.uint8))
                wire.write(o, wire.from_bytes(src, o.dtype, o.shape))
            if final is not None and final[0] is not final[1]:
                wire.write(final[0], final[1])

        result = [final[0]] if final is not None else list(outs)
        return _Plan(meta, run, result, wire.devices_of(result))

    def gather(
        self, output_tensors: list[list[torch.Tensor]], input_tensors: list[torch.Tensor], opts: Any = None
    ) -> FLTorrentWork:
        opts = dist.GatherOptions() if opts is None else opts
        root = int(opts.rootRank)

        def build():
            inp = wire.one(input_tensors, "gather")
            if not 0 <= root < self._size:
                raise UnsupportedError(f"gather: root {root} out of range")
            outs: list[torch.Tensor] = []
            if self._rank == root:
                if len(output_tensors) != 1:
                    raise UnsupportedError("gather: the root needs exactly one output list")
                outs = list(output_tensors[0])
                self._check_outputs("gather", outs, inp)
            elif output_tensors and any(len(o) for o in output_tensors):
                raise UnsupportedError("gather: only the root passes output tensors")
            mine = wire.host_bytes(inp)
            meta = wire.meta_tensors("gather", [inp], root=root)

            def run(deadline, seq):
                if self._rank != root:
                    if mine.size:
                        self._exchange({root: mine}, {}, self._tag(seq), deadline, f"gather #{seq}")
                    return
                recv = {r: np.empty(mine.size, dtype=np.uint8) for r in range(self._size) if r != root}
                if mine.size:
                    self._exchange({}, recv, self._tag(seq), deadline, f"gather #{seq}")
                for r, o in enumerate(outs):
                    wire.write(o, wire.from_bytes(mine if r == root else recv[r], o.dtype, o.shape))

            return _Plan(meta, run, outs, wire.devices_of([inp, *outs]))

        return self._collective("gather", build, opts)

    def scatter(
        self, output_tensors: list[torch.Tensor], input_tensors: list[list[torch.Tensor]], opts: Any = None
    ) -> FLTorrentWork:
        opts = dist.ScatterOptions() if opts is None else opts
        root = int(opts.rootRank)

        def build():
            out = wire.one(output_tensors, "scatter")
            if not 0 <= root < self._size:
                raise UnsupportedError(f"scatter: root {root} out of range")
            pieces: list[np.ndarray] = []
            if self._rank == root:
                if len(input_tensors) != 1:
                    raise UnsupportedError("scatter: the root needs exactly one input list")
                ins = list(input_tensors[0])
                self._check_outputs("scatter", ins, out)
                pieces = [wire.host_bytes(t) for t in ins]
            elif input_tensors and any(len(i) for i in input_tensors):
                raise UnsupportedError("scatter: only the root passes input tensors")
            meta = wire.meta_tensors("scatter", [out], root=root)
            nb = wire.nbytes(out)

            def run(deadline, seq):
                if self._rank == root:
                    sends = {r: pieces[r] for r in range(self._size) if r != root}
                    if nb:
                        self._exchange(sends, {}, self._tag(seq), deadline, f"scatter #{seq}")
                    wire.write(out, wire.from_bytes(pieces[root], out.dtype, out.shape))
                else:
                    buf = np.empty(nb, dtype=np.uint8)
                    if nb:
                        self._exchange({}, {root: buf}, self._tag(seq), deadline, f"scatter #{seq}")
                    wire.write(out, wire.from_bytes(buf, out.dtype, out.shape))

            return _Plan(meta, run, [out], wire.devices_of([out]))

        return self._collective("scatter", build, opts)

    def barrier(self, opts: Any = None) -> FLTorrentWork:
        def build():
            meta = wire.meta(0, "barrier")

            def run(deadline, seq):
                if self._size > 1:  # an all-gather of one byte: the transports' one collective
                    mine, allb = np.zeros(1, dtype=np.uint8), np.empty(self._size, dtype=np.uint8)
                    req = self._coll.post_allgather(mine, allb)
                    self._wait_reqs(self._coll, [req], ["all"], deadline, f"barrier #{seq}", keep=(mine, allb))

            return _Plan(meta, run, [], ())

        return self._collective("barrier", build, opts)

    def monitored_barrier(self, timeout: timedelta | None = None, wait_all_ranks: bool = False) -> None:
        """Rank 0 collects a token from every rank, then releases them; names the ranks that never came."""
        limit = self._timeout_s if unset_timeout(timeout) else timeout.total_seconds()
        tag = TAG_LIMIT  # a tag user send/recv never use (they stay below it)

        def run(deadline):
            if self._size == 1:
                return
            net = self._p2p
            tok = {r: np.zeros(1, dtype=np.uint8) for r in range(self._size)}
            others = list(range(1, self._size))
            if self._rank == 0:
                reqs = [net.post_recv(tok[r], r, tag) for r in others]
                missing: list = []
                try:
                    self._wait_reqs(net, reqs, others, deadline, "monitored_barrier", [True] * len(reqs), tok, missing)
                except PeerTimeoutError:
                    shown = missing if wait_all_ranks else missing[:1]
                    raise PeerTimeoutError(
                        f"fltorrent monitored_barrier: rank(s) {shown} failed to pass the barrier within {limit:.1f}s"
                    ) from None
                rel = [net.post_send(tok[0], r, tag) for r in others]
                self._wait_reqs(net, rel, others, deadline, "monitored_barrier release", keep=tok)
            else:
                self._wait_reqs(net, [net.post_send(tok[self._rank], 0, tag)], [0], deadline, "monitored_barrier")
                self._wait_reqs(
                    net,
                    [net.post_recv(tok[0], 0, tag)],
                    [0],
                    deadline,
                    "monitored_barrier release (rank 0 reported a missing rank or died)",
                    [True],
                    tok,
                )

        self._submit("monitored_barrier", run, [], limit).wait()

    # ----------------------------------------------------------------- point-to-point

    def _check_tag(self, tag: int, what: str) -> int:
        if not 0 <= int(tag) < TAG_LIMIT:
            raise UnsupportedError(f"{what}: tag {tag} must be in [0, {TAG_LIMIT})")
        return int(tag)

    def send(self, tensors: list[torch.Tensor], dstRank: int, tag: int = 0) -> FLTorrentWork:  # noqa: N803
        t = wire.one(tensors, "send")
        dst = int(dstRank)
        if not 0 <= dst < self._size:
            raise UnsupportedError(f"send: destination {dst} out of range for a group of {self._size}")
        tag = self._check_tag(tag, "send")
        buf = wire.host_bytes(t)
        work = FLTorrentWork(f"send to {dst}", [t], (), limit_s=2 * self._timeout_s + 60)

        def post(deadline):
            req = self._p2p.post_send(buf, dst, tag)
            self._inflight.append(P2P(req, work, deadline, f"send of {buf.size} B (tag {tag})", dst, buf))

        return self._post(work, post)

    def recv(self, tensors: list[torch.Tensor], srcRank: int, tag: int = 0) -> FLTorrentWork:  # noqa: N803
        src = int(srcRank)
        if not 0 <= src < self._size:
            raise UnsupportedError(f"recv: source {src} out of range for a group of {self._size}")
        return self._recv(tensors, src, tag)

    def recv_anysource(self, tensors: list[torch.Tensor], tag: int = 0) -> FLTorrentWork:
        return self._recv(tensors, -1, tag)

    def _recv(self, tensors: list[torch.Tensor], src: int, tag: int) -> FLTorrentWork:
        t = wire.one(tensors, "recv")
        tag = self._check_tag(tag, "recv")
        direct = t.device.type == "cpu" and t.is_contiguous()
        buf = wire.host_bytes(t) if direct else np.empty(wire.nbytes(t), dtype=np.uint8)
        work = FLTorrentWork(
            f"recv from {src if src >= 0 else 'any'}", [t], wire.devices_of([t]), limit_s=2 * self._timeout_s + 60
        )

        def done(req):
            work._source, n = self._p2p.recv_status(req)
            if n != buf.size:
                raise ShapeMismatchError(f"recv: got {n} bytes from rank {work._source}, expected {buf.size}")
            if not direct:
                wire.write(t, wire.from_bytes(buf, t.dtype, t.shape))

        def post(deadline):
            req = self._p2p.post_recv_status(buf, ANY_SOURCE if src < 0 else src, tag)
            what = f"recv of {buf.size} B (tag {tag})"
            self._inflight.append(P2P(req, work, deadline, what, src if src >= 0 else "any", buf, done))

        return self._post(work, post)

    def _post(self, work: FLTorrentWork, post: Callable[[float], None]) -> FLTorrentWork:
        """Queue the posting of a p2p op; completion is driven by the comm thread, never at post time."""
        self._check_usable(work._name)

        def run(deadline):
            try:
                post(deadline)
            except BaseException as e:  # noqa: BLE001 - a post that failed fails its Work, not the comm thread
                work._finish(e)

        self._q.put(Job(work._name, run, None, self._timeout_s))
        return work

    # ----------------------------------------------------------------- device data plane

    def device_plane(self, device: torch.device) -> Any:
        """The buffer plane (chunks/plane.py) for `swarm_round`s on `device`, or None: host staging.

        A CUDA device gets a `TorchPlane` when runs can move device to device: nothing to move in a group of one,
        else NCCL (CuPy's, bootstrapped over this group's transport on the first device round); `plane_why`
        says why not otherwise.  A plane installed with `set_device_plane` serves its own device.
        """
        from ..chunks.plane import TorchPlane

        device = torch.device(device)
        if self._plane is not None and self._plane.device == device:
            return self._plane
        if device.type != "cuda":
            return None
        if self._size > 1:
            from ..transport.nccl import nccl_available, nccl_unavailable_reason

            if not nccl_available():
                self._plane_why = nccl_unavailable_reason()
                return None
        if self._plane is not None:
            self._plane.close()
        self._plane = TorchPlane(device)
        return self._plane

    @property
    def plane_why(self) -> str:
        """Why the last `device_plane` call answered None for a CUDA device ("" when it did not)."""
        return self._plane_why

    def set_device_plane(self, plane: Any) -> None:
        """Install a device plane with its data transport (`plane.data`) for rounds on `plane.device`: for a
        transport this group cannot build itself (a CUDA-aware MPI) and for tests.  Every rank installs one."""
        if self._plane is not None and self._plane is not plane:
            self._plane.close()
        self._plane = plane

    # ----------------------------------------------------------------- lifecycle

    def shutdown(self) -> None:
        """Finish queued work (bounded), stop the comm thread, free communicators and the engine; idempotent."""
        if self._state in ("closed", "closing"):
            return
        if self._state == "running":
            self._state = "closing"
            self._q.put(STOP)
            self._thread.join(self._timeout_s + 5)
        self._release()
        self._state = "closed" if self._state != "aborted" else "aborted"

    def abort(self) -> None:
        """Fail all queued and in-flight work now and stop the comm thread; idempotent, never blocks long."""
        if self._state in ("aborted", "closed"):
            return
        self._state = "aborted"
        self._q.put(STOP)
        self._thread.join(5.0)
        if not self._thread.is_alive():
            self._fail_inflight(FLTorrentError(f"fltorrent group {self._label} was aborted"))
        while True:
            try:
                item = self._q.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, Job) and item.work is not None:
                item.work._finish(FLTorrentError(f"fltorrent {item.name}: the group was aborted"))

    def _release(self) -> None:
        if self._thread.is_alive():
            return  # still inside the transport; freeing its contexts under it would crash
        # contexts first, then the engine, the device plane and the root transport (an owned MPI sub-communicator;
        # goodbyes to gloo peers); MPI may already be finalized, so a failing close is ignored
        for attr in ("_coll", "_p2p", "_engine", "_plane", "_net"):
            obj = getattr(self, attr, None)
            if obj is not None:
                try:
                    obj.close()
                except Exception:  # noqa: BLE001
                    pass
                setattr(self, attr, None)
        self._comm = None


# --------------------------------------------------------------------------------------------- internals


class _Round:
    """The swarm round an op runs: its payload and engine arguments (the collectives use the defaults)."""

    __slots__ = ("payload", "weight", "privacy", "deadline_s", "consensus", "out", "plane", "sink")

    def __init__(
        self,
        payload: np.ndarray | torch.Tensor,
        weight: float = 1.0,
        privacy: Any = None,
        deadline_s: float | None = None,
        consensus: bool = True,
        out: list[np.ndarray] | None = None,
        plane: Any = None,
        sink: Any = None,
    ) -> None:
        self.payload, self.weight, self.privacy, self.deadline_s = payload, weight, privacy, deadline_s
        self.consensus, self.plane, self.sink = consensus, plane, sink
        self.out = out  # per-rank uint8 views of the caller's outputs: the engine receives into them in place


def _nbytes(payload: np.ndarray | torch.Tensor) -> int:
    """Bytes of a round's payload: host bytes, or a uint8 tensor of a device plane."""
    return int(payload.numel()) if isinstance(payload, torch.Tensor) else int(payload.size)


class _Plan(NamedTuple):
    """What an op's local validation (`build`) hands the comm thread; `round` is None for direct ops."""

    meta: np.ndarray
    run: Callable[[float, int], None]
    outputs: list
    devices: Sequence[torch.device]
    round: _Round | None = None


class _Opts:
    def __init__(self, timeout_s: float) -> None:
        self.timeout = timedelta(seconds=timeout_s)


class _LocalRound:
    """RoundResult of a group of one (no engine needed)."""

    def __init__(self, payload: np.ndarray, weight: float) -> None:
        self.updates = [payload]
        self.weights = np.array([weight], dtype=np.float64)
        self.participants = np.array([0], dtype=np.int64)
        self.stats = {"bytes_sent": 0, "bytes_recv": 0, "warmup_s": 0.0, "swarm_s": 0.0, "round_s": 0.0}


def swarm_deadline_s(deadline_s: float | None, config_deadline_s: float, left_s: float) -> float:
    """Seconds the engine may run a round: the caller's deadline, else the config's (0 = none), never more than
    `left_s`, the time left before the op's own deadline; at least 1 ms (the engine reads 0 as "no deadline")."""
    asked = deadline_s if deadline_s is not None else (config_deadline_s or None)
    left = max(float(left_s), 1e-3)
    return left if asked is None else max(min(float(asked), left), 1e-3)


def _make_engine(net: Transport, config: SwarmConfig) -> Any:
    if _engine_factory is not None:
        return _engine_factory(net, config)
    from ..runtime.engine import SwarmEngine  # lazy: backend.py imports before the engine exists

    return SwarmEngine(net, config)


def _p2p_error(op: P2P, why: str) -> Exception:
    """A failed user send/recv as an fltorrent error, classified by the reason's type (Truncated: too long)."""
    if isinstance(why, Truncated):
        return TruncationError(f"fltorrent {op.what} from rank {op.peer}: message longer than the buffer ({why})")
    return FLTorrentError(f"fltorrent {op.what} with rank {op.peer}: {why}")


@atexit.register
def _shutdown_all() -> None:
    """Stop comm threads before mpi4py finalizes MPI (atexit runs this first: registered later)."""
    for pg in list(_LIVE_GROUPS):
        try:
            pg.shutdown()
        except Exception:  # noqa: BLE001
            pass
