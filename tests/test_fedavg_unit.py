"""Unit tests of fedavg_ / aggregate_ settings and errors that need no mpiexec (one-rank groups over COMM_SELF).

.venv/bin/python -m pytest -q tests/test_fedavg_unit.py
"""

from __future__ import annotations

import pytest
import torch

import fltorrent_hpc
from fltorrent_hpc.api import aggregate as agg
from fltorrent_hpc.api import wire
from fltorrent_hpc.api.fedavg import resolve_privacy
from fltorrent_hpc.api.group import FLTorrentProcessGroup, swarm_deadline_s
from fltorrent_hpc.config import PRIVACY_MECHANISMS, SwarmConfig
from fltorrent_hpc.errors import FLTorrentError, NothingToAverageError

pytestmark = pytest.mark.timeout(60)
FULL = frozenset(PRIVACY_MECHANISMS)


def test_privacy_default_env_and_argument_precedence():
    default = SwarmConfig.from_env(environ={})
    from_env = SwarmConfig.from_env(environ={"FLTORRENT_PRIVACY": "spray,lags"})
    assert resolve_privacy(None, default) == FULL  # no env, no argument: SwarmConfig's default
    assert resolve_privacy(None, from_env) == {"spray", "lags"}  # env over default
    assert resolve_privacy("none", from_env) == frozenset()  # argument over env
    assert resolve_privacy("full", from_env) == FULL
    assert resolve_privacy(frozenset({"gating"}), default) == {"gating"}


@pytest.fixture
def solo_env(monkeypatch):
    """A one-rank group built the way torch builds one without pg_options: its config comes from the env."""
    from mpi4py import MPI

    monkeypatch.setenv("FLTORRENT_PRIVACY", "lags")
    pg = FLTorrentProcessGroup(MPI.COMM_SELF, timeout_s=10)
    seen: list = []
    real = pg.swarm_round

    def spy(*args, **kwargs):
        seen.append(kwargs.get("privacy"))
        return real(*args, **kwargs)

    pg.swarm_round = spy
    yield pg, seen
    pg.shutdown()


def test_fedavg_uses_the_group_config_privacy_unless_given(solo_env):
    pg, seen = solo_env
    assert pg.config.privacy == {"lags"}
    t = [torch.ones(4)]
    fltorrent_hpc.fedavg_(t, weight=2.0, group=pg)
    fltorrent_hpc.fedavg_(t, weight=2.0, group=pg, privacy="spray")
    assert seen == [frozenset({"lags"}), frozenset({"spray"})]
    assert t[0].tolist() == [1.0] * 4


def test_fedavg_with_zero_total_weight_raises_nothing_to_average(solo_env):
    pg, _ = solo_env
    with pytest.raises(NothingToAverageError, match="nothing to average"):
        fltorrent_hpc.fedavg_([torch.ones(3)], weight=0.0, group=pg)
    assert issubclass(NothingToAverageError, FLTorrentError)
    t = [torch.full((2,), 3.0)]
    fltorrent_hpc.fedavg_(t, weight=1.0, group=pg)  # the group is still usable
    assert t[0].tolist() == [3.0, 3.0]


def test_aggregate_applies_a_robust_rule_over_a_one_rank_round(solo_env):
    pg, seen = solo_env
    start = [torch.zeros(3), torch.ones(2)]
    tensors = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, 1.5])]
    delta = agg.flat_update(tensors, start)
    rep = fltorrent_hpc.aggregate_(tensors, start, delta, "median", 4.0, group=pg)
    assert rep.participants == [0] and rep.weights == [4.0] and seen == [frozenset({"lags"})]
    assert tensors[0].tolist() == [1.0, 2.0, 3.0] and tensors[1].tolist() == [0.5, 1.5]
    with pytest.raises(FLTorrentError, match="float32"):
        fltorrent_hpc.aggregate_(tensors, start, delta.double(), "median", group=pg)
    with pytest.raises(ValueError, match="unknown aggregation rule"):
        fltorrent_hpc.aggregate_(tensors, start, delta, "mode", group=pg)


def test_swarm_deadline_is_the_callers_else_the_configs_capped_by_the_op():
    assert swarm_deadline_s(None, 0.0, 100.0) == 100.0  # none asked: the op's time left
    assert swarm_deadline_s(None, 7.0, 100.0) == 7.0  # the config's deadline_s
    assert swarm_deadline_s(5.0, 7.0, 100.0) == 5.0  # the caller's wins over the config's
    assert swarm_deadline_s(500.0, 0.0, 100.0) == 100.0  # never past the op's own deadline
    assert swarm_deadline_s(None, 0.0, -3.0) == 1e-3  # never 0, which the engine reads as "no deadline"


def test_descriptor_names_the_engine_round_words():
    a = wire.meta(1, "swarm_round", numel=64)
    b = a.copy()
    a[wire.OP_W :] = [1, 0, 64, 256, 0b111, 10, 0, 4, 1, 1, 0, 2, 4096, 6]
    b[wire.OP_W :] = [1, 0, 64, 256, 0b011, 10, 0, 4, 1, 1, 0, 2, 4096, 6]
    assert wire.differences(a, b, 0, 2) == ["privacy: rank 0 spray,lags,gating vs rank 2 spray,lags"]
    assert wire.META_W == len(wire.OP_FIELDS) + len(wire.ROUND_FIELDS)


def test_finite_update_checks_every_float_of_every_dtype():
    import math

    from fltorrent_hpc.api.fedavg import finite_update
    from fltorrent_hpc.chunks.kernels import pack_segments
    from fltorrent_hpc.chunks.layout import Layout

    ts = [torch.ones(5, dtype=torch.float32), torch.ones(3, dtype=torch.bfloat16), torch.ones(4, dtype=torch.float16)]
    lay = Layout.from_tensors(ts)
    assert finite_update(pack_segments(ts, lay).numpy(), lay)
    for j, v in ((0, math.nan), (1, math.inf), (2, -math.inf)):
        bad = [t.clone() for t in ts]
        bad[j][-1] = v
        assert not finite_update(pack_segments(bad, lay).numpy(), lay), (j, v)


def test_integrity_and_nonfinite_options_are_checked():
    from fltorrent_hpc.config import SwarmConfig
    from fltorrent_hpc.errors import ConfigError

    assert SwarmConfig().integrity == "blake3" and SwarmConfig().nonfinite == "reject"
    with pytest.raises(ConfigError, match="could be forged"):
        SwarmConfig(integrity="hash")
    with pytest.raises(ConfigError, match="nonfinite"):
        SwarmConfig(nonfinite="ignore")
