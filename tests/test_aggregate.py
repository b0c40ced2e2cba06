"""Aggregation rules (fltorrent_hpc/aggregate.py): FedAvg bit for bit as fedavg_ computes it, the robust rules'
definitions, their robustness to an outlier, determinism and the device they run on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fltorrent_hpc.api import aggregate as agg
from fltorrent_hpc.chunks.kernels import pack_segments
from fltorrent_hpc.chunks.layout import Layout


def rand_updates(k: int, n: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(k, n, generator=g).to(dtype)


def by_hand_fedavg(x: torch.Tensor, ws: list[float]) -> torch.Tensor:
    """fedavg_'s documented arithmetic: acc = fl32(acc + fl32(fl32(w) * x)) in order, then fl32(acc / fl32(W))."""
    acc = torch.zeros(x.shape[1], dtype=torch.float32)
    for row, w in zip(x, ws):
        acc = acc + row.float() * torch.tensor(w, dtype=torch.float32)
    return acc / torch.tensor([float(sum(np.float64(w) for w in ws))], dtype=torch.float32)


def test_fedavg_matches_documented_arithmetic_bit_for_bit():
    x = rand_updates(5, 1003)
    ws = [359.0, 360.0, 17.0, 1.5, 1000.25]
    got = agg.fedavg(x, ws)
    assert got.dtype == torch.float32 and torch.equal(got, by_hand_fedavg(x, ws))


def test_fedavg_packed_equals_fedavg_kernels_path_on_a_model():
    """Mixed shapes and dtypes, packed by layout: what fedavg_ does after the swarm round."""
    g = torch.Generator().manual_seed(3)
    shapes = [(7, 5), (5,), (3, 2, 2)]
    dts = [torch.float32, torch.bfloat16, torch.float16]
    peers = [[torch.randn(s, generator=g).to(d) for s, d in zip(shapes, dts)] for _ in range(4)]
    layout = Layout.from_tensors(peers[0])
    payloads = [pack_segments(p, layout).numpy() for p in peers]
    ws = [10.0, 20.0, 30.0, 40.0]
    out = [torch.empty(s, dtype=d) for s, d in zip(shapes, dts)]
    agg.fedavg_packed_(out, layout, payloads, ws)
    for j, (s, d) in enumerate(zip(shapes, dts)):
        x = torch.stack([p[j].reshape(-1).float() for p in peers])
        want = by_hand_fedavg(x, ws).to(d).view(s)
        assert out[j].dtype == d and torch.equal(out[j], want), f"entry {j}"


def test_fedavg_order_is_rank_order():
    x = rand_updates(4, 4096, seed=1)
    ws = [1.0, 3.0, 5.0, 7.0]
    a = agg.fedavg(x, ws)
    assert torch.equal(a, agg.fedavg(x.clone(), ws))  # deterministic
    # the documented order is rank order: reordering generally changes low bits, the formula must still hold
    rev = agg.fedavg(x.flip(0), ws[::-1])
    assert torch.equal(rev, by_hand_fedavg(x.flip(0), ws[::-1]))
    assert torch.allclose(a, rev, atol=1e-6)


def test_fedavg_rejects_bad_weights():
    x = rand_updates(2, 8)
    with pytest.raises(ValueError):
        agg.fedavg(x, [0.0, 0.0])
    with pytest.raises(ValueError):
        agg.fedavg(x, [1.0])


def test_median_odd_and_even():
    x = torch.tensor([[1.0, 5.0], [3.0, -1.0], [2.0, 0.0]])
    assert torch.equal(agg.median(x), torch.tensor([2.0, 0.0]))
    x4 = torch.tensor([[1.0, 5.0], [3.0, -1.0], [2.0, 0.0], [10.0, 1.0]])
    assert torch.equal(agg.median(x4), torch.tensor([2.5, 0.5]))
    assert torch.equal(agg.median([torch.tensor([4.0])]), torch.tensor([4.0]))


def test_trimmed_mean_definition():
    x = torch.tensor([[1.0], [100.0], [2.0], [3.0], [-50.0]])
    assert torch.equal(agg.trimmed_mean(x, 1), torch.tensor([2.0]))
    assert torch.equal(agg.trimmed_mean(x, 0), x.sum(0) / 5)
    with pytest.raises(ValueError):
        agg.trimmed_mean(x, 3)


def test_krum_picks_a_central_update_and_ignores_the_outlier():
    g = torch.Generator().manual_seed(0)
    honest = 1.0 + 0.01 * torch.randn(5, 64, generator=g)
    bad = -10.0 * torch.ones(1, 64)
    x = torch.cat([honest, bad])
    keep = agg.krum_select(x, f=1)
    assert keep and 5 not in keep
    out = agg.krum(x, f=1)
    assert torch.equal(out, x[keep[0]])
    multi = agg.krum(x, f=1, multi=3)
    keep3 = agg.krum_select(x, f=1, multi=3)
    assert len(keep3) == 3 and 5 not in keep3
    assert torch.allclose(multi, x[keep3].mean(0), atol=1e-6)


def test_krum_small_sets_and_ties():
    x = torch.ones(2, 3)
    assert agg.krum_select(x, f=1) == [0]  # equal scores: the lower rank
    assert torch.equal(agg.krum(x[:1], f=1), x[0])


@pytest.mark.parametrize("rule", ["median", "trimmed-mean", "krum"])
def test_robust_rules_resist_one_scaled_update_of_four(rule):
    g = torch.Generator().manual_seed(7)
    true = torch.randn(256, generator=g)
    honest = true + 0.05 * torch.randn(3, 256, generator=g)
    x = torch.cat([honest, -10.0 * honest[:1]])  # one peer sends -10x its update
    out = agg.aggregate(rule, x, [1.0] * 4, f=1)
    mean = agg.aggregate("fedavg", x, [1.0] * 4)
    err_rule = (out - true).norm() / true.norm()
    err_mean = (mean - true).norm() / true.norm()
    assert err_rule < 0.5 < err_mean


@pytest.mark.parametrize("rule", agg.RULES)
def test_rules_are_deterministic_fp32_and_stay_on_device(rule):
    x = rand_updates(5, 333, seed=2, dtype=torch.bfloat16)
    a = agg.aggregate(rule, x, [1.0, 2.0, 3.0, 4.0, 5.0], f=1)
    b = agg.aggregate(rule, [r.clone() for r in x], [1.0, 2.0, 3.0, 4.0, 5.0], f=1)
    assert a.dtype == torch.float32 and a.shape == (333,) and a.device == x.device
    assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.cuda
@pytest.mark.parametrize("rule", agg.RULES)
def test_rules_on_cuda(rule):
    x = rand_updates(4, 1000, seed=5)
    out = agg.aggregate(rule, x.cuda(), [1.0, 2.0, 3.0, 4.0], f=1)
    assert out.device.type == "cuda"
    assert torch.allclose(out.cpu(), agg.aggregate(rule, x, [1.0, 2.0, 3.0, 4.0], f=1), atol=1e-6)


def test_canonical_rule_names():
    assert agg.canonical_rule("Trimmed_Mean") == "trimmed-mean"
    assert agg.canonical_rule("mean") == "fedavg"
    with pytest.raises(ValueError):
        agg.canonical_rule("bulyan")


def test_flat_update_and_apply_roundtrip():
    g = torch.Generator().manual_seed(4)
    start = [torch.randn(3, 4, generator=g), torch.randn(5, generator=g).to(torch.bfloat16)]
    now = [s.float().add(0.25).to(s.dtype) for s in start]
    d = agg.flat_update(now, start)
    assert d.dtype == torch.float32 and d.numel() == 17
    out = [torch.empty_like(s) for s in start]
    agg.apply_update_(out, start, d)
    for o, n in zip(out, now):
        assert torch.equal(o, n)
    with pytest.raises(ValueError):
        agg.apply_update_(out, start, d[:-1])


def test_empty_and_mismatched_inputs_raise():
    with pytest.raises(ValueError):
        agg.median([])
    with pytest.raises(ValueError):
        agg.median([torch.zeros(3), torch.zeros(4)])
    with pytest.raises(ValueError):
        agg.median(torch.zeros(3))
