"""Aggregation rules over the reconstructable set: FedAvg (weighted), coordinate-wise median, trimmed mean, Krum.

Every rule takes the updates of the peers in the agreed set A **in rank order** (a 2-D tensor [|A|, numel], or
a sequence of 1-D tensors) on the model's device and returns one fp32 vector on that device.  The rules are
deterministic: the same updates in the same order give the same bits, so every rank of a swarm round (which
agree on A) and a server computing over the same updates get identical results.

- ``fedavg``: sum_u (w_u / W) * x_u with exactly `fltorrent_hpc.fedavg_`'s arithmetic: the same kernels
  (`kernels.accumulate_`, `kernels.finalize_fedavg_`), acc = fl32(acc + fl32(fl32(w_u) * x_u)) in rank order
  from zero, then fl32(acc / fl32(W)) with W the float64 sum of the weights in rank order.  `fedavg_packed_`
  is the same on packed payloads (layout.py), i.e. what `fedavg_` does after its swarm round.
- ``median``: coordinate-wise median (the mean of the two middle values when |A| is even).
- ``trimmed-mean``: coordinate-wise mean after dropping the `trim` largest and `trim` smallest values.
- ``krum``: Krum (Blanchard et al., NeurIPS 2017): the update whose summed squared distance to its
  |A| - f - 2 nearest others is smallest (at least 1 neighbour); `multi` > 1 averages the `multi` best
  (Multi-Krum).  Ties go to the lower rank.

The robust rules ignore the FedAvg weights (as in the literature); FedAvg uses them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..chunks.layout import Layout

RULES = ("fedavg", "median", "trimmed-mean", "krum")
_ALIASES = {"mean": "fedavg", "trimmed_mean": "trimmed-mean", "trim": "trimmed-mean", "trimmedmean": "trimmed-mean"}


def canonical_rule(rule: str) -> str:
    """'trimmed_mean' -> 'trimmed-mean'; ValueError for an unknown rule."""
    r = rule.strip().lower()
    r = _ALIASES.get(r, r)
    if r not in RULES:
        raise ValueError(f"unknown aggregation rule {rule!r}; choose from {', '.join(RULES)}")
    return r


def _stack(updates: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """[k, numel] fp32 view/copy of the updates (rows in the given order)."""
    if isinstance(updates, torch.Tensor):
        if updates.dim() != 2:
            raise ValueError(f"updates must be a 2-D [peers, numel] tensor, got shape {tuple(updates.shape)}")
        x = updates
    else:
        rows = list(updates)
        if not rows:
            raise ValueError("no updates to aggregate (the reconstructable set is empty)")
        shapes = {tuple(r.reshape(-1).shape) for r in rows}
        devs = {r.device for r in rows}
        if len(shapes) != 1 or len(devs) != 1:
            raise ValueError(f"updates differ in size {sorted(shapes)} or device {sorted(map(str, devs))}")
        x = torch.stack([r.reshape(-1) for r in rows])
    if x.shape[0] == 0:
        raise ValueError("no updates to aggregate (the reconstructable set is empty)")
    if not x.is_floating_point():
        raise ValueError(f"updates must be floating point, got {x.dtype}")
    return x.float().contiguous()


# ------------------------------------------------------------------------------------------------ FedAvg


@torch.no_grad()
def fedavg_packed_(
    tensors: Sequence[torch.Tensor],
    layout: Layout,
    payloads: Sequence[np.ndarray | torch.Tensor],
    weights: Sequence[float],
) -> None:
    """Overwrite `tensors` with the weighted FedAvg of packed payloads (layout.py form), in the given order.

    This is `fedavg_`'s aggregation step (kernels.accumulate_ per whole update in rank order, then
    kernels.finalize_fedavg_), so a server computing it over the same payloads gets `fedavg_`'s bits.
    """
    from ..chunks.kernels import accumulate_, finalize_fedavg_

    if len(payloads) != len(weights) or not payloads:
        raise ValueError(f"{len(payloads)} payloads for {len(weights)} weights (need >= 1 of each)")
    device = layout.check_tensors(list(tensors))
    total = float(sum(np.float64(w) for w in weights))  # float64, rank order: as fedavg_ sums RoundResult.weights
    if not np.isfinite(total) or total <= 0:
        raise ValueError(f"FedAvg total weight must be finite and > 0, got {total}")
    if layout.total_bytes == 0:
        return
    acc = torch.zeros(layout.numel, dtype=torch.float32, device=device)
    C = layout.total_bytes  # whole updates as one chunk each, as fedavg_ does
    for u, w in zip(payloads, weights):
        src = u if isinstance(u, torch.Tensor) else torch.from_numpy(u if u.flags.writeable else u.copy())
        src = src.reshape(-1).view(torch.uint8).to(device)
        if src.numel() != C:
            raise ValueError(f"payload of {src.numel()} bytes, layout needs {C}")
        accumulate_(acc, [0], src, float(w), layout, C)
    finalize_fedavg_(acc, total, list(tensors), layout)


def fedavg(updates: torch.Tensor | Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Weighted mean sum_u (w_u / W) * x_u of flat updates with fedavg_'s arithmetic; fp32 [numel]."""
    from ..chunks.kernels import pack_segments

    x = _stack(updates)
    if len(weights) != x.shape[0]:
        raise ValueError(f"{x.shape[0]} updates but {len(weights)} weights")
    layout = Layout.from_specs([("update", "float32", (x.shape[1],))])
    out = torch.empty(x.shape[1], dtype=torch.float32, device=x.device)
    fedavg_packed_([out], layout, [pack_segments([row], layout) for row in x], weights)
    return out


# ------------------------------------------------------------------------------------------------ robust


@torch.no_grad()
def median(updates: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """Coordinate-wise median; with an even count, fl32((a + b) * 0.5) of the two middle values."""
    x = _stack(updates)
    k = x.shape[0]
    s = torch.sort(x, dim=0).values
    if k % 2:
        return s[k // 2].clone()
    return (s[k // 2 - 1] + s[k // 2]) * 0.5


@torch.no_grad()
def trimmed_mean(updates: torch.Tensor | Sequence[torch.Tensor], trim: int) -> torch.Tensor:
    """Coordinate-wise mean of the values left after dropping the `trim` smallest and `trim` largest."""
    x = _stack(updates)
    k = x.shape[0]
    b = int(trim)
    if b < 0 or k - 2 * b < 1:
        raise ValueError(f"trimmed mean: cannot trim {b} from each side of {k} updates")
    s = torch.sort(x, dim=0).values[b : k - b]
    acc = s[0].clone()
    for row in s[1:]:  # a fixed summation order, independent of the reduction kernel
        acc.add_(row)
    return acc / float(k - 2 * b)


@torch.no_grad()
def krum_scores(updates: torch.Tensor | Sequence[torch.Tensor], f: int) -> torch.Tensor:
    """Krum score of every update (float64 [k]): sum of squared distances to its max(1, k-f-2) nearest others."""
    x = _stack(updates).double()
    k = x.shape[0]
    if k == 1:
        return torch.zeros(1, dtype=torch.float64, device=x.device)
    d = torch.stack([((x - x[i]) ** 2).sum(dim=1) for i in range(k)])  # exact differences, no matmul expansion
    d.fill_diagonal_(float("inf"))
    nb = max(1, min(k - 1, k - int(f) - 2))
    return torch.sort(d, dim=1).values[:, :nb].sum(dim=1)


def krum_select(updates: torch.Tensor | Sequence[torch.Tensor], f: int, multi: int = 1) -> list[int]:
    """Row indices Krum keeps (the `multi` lowest scores; ties to the lower index), in ascending order."""
    scores = krum_scores(updates, f).cpu().numpy()
    m = max(1, min(int(multi), scores.size))
    return sorted(int(i) for i in np.argsort(scores, kind="stable")[:m])


@torch.no_grad()
def krum(updates: torch.Tensor | Sequence[torch.Tensor], f: int, multi: int = 1) -> torch.Tensor:
    """Krum (multi=1) or Multi-Krum (mean of the `multi` best, in rank order)."""
    x = _stack(updates)
    keep = krum_select(x, f, multi)
    acc = x[keep[0]].clone()
    for i in keep[1:]:
        acc.add_(x[i])
    return acc / float(len(keep)) if len(keep) > 1 else acc


# ------------------------------------------------------------------------------------------------ dispatch


def aggregate(
    rule: str,
    updates: torch.Tensor | Sequence[torch.Tensor],
    weights: Sequence[float] | None = None,
    *,
    f: int = 1,
    trim: int | None = None,
    multi: int = 1,
) -> torch.Tensor:
    """Apply `rule` to the updates (rank order); fp32 [numel] on their device.

    f: number of Byzantine peers assumed (Krum's f; the trimmed mean trims `trim`, default f, per side,
    reduced so that at least one value is left).
    """
    r = canonical_rule(rule)
    x = _stack(updates)
    if r == "fedavg":
        w = [1.0] * x.shape[0] if weights is None else list(weights)
        return fedavg(x, w)
    if r == "median":
        return median(x)
    if r == "trimmed-mean":
        b = int(f if trim is None else trim)
        return trimmed_mean(x, max(0, min(b, (x.shape[0] - 1) // 2)))
    return krum(x, f, multi)


# ------------------------------------------------------------------------------------------------ helpers


@torch.no_grad()
def flat_update(tensors: Sequence[torch.Tensor], start: Sequence[torch.Tensor]) -> torch.Tensor:
    """fp32 [numel]: concatenation of (t - s) over the tensors, each difference taken in fp32."""
    if len(tensors) != len(start):
        raise ValueError(f"{len(tensors)} tensors but {len(start)} starting tensors")
    return torch.cat([(t.detach().float() - s.float()).reshape(-1) for t, s in zip(tensors, start)])


@torch.no_grad()
def apply_update_(tensors: Sequence[torch.Tensor], start: Sequence[torch.Tensor], agg: torch.Tensor) -> None:
    """tensors <- dtype(fl32(start + agg slice)), in place."""
    total = sum(t.numel() for t in tensors)
    if agg.numel() != total:
        raise ValueError(f"aggregate has {agg.numel()} elements, tensors have {total}")
    pos = 0
    for t, s in zip(tensors, start):
        n = t.numel()
        t.copy_((s.float() + agg[pos : pos + n].view(t.shape)).to(t.dtype))
        pos += n
