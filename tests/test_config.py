"""SwarmConfig and the unit parsing at its edges (config.py): sizes, rates, ranges, privacy, env overrides."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fltorrent_hpc.config import (
    PRIVACY_MECHANISMS,
    SwarmConfig,
    parse_bytes,
    parse_privacy,
    parse_range,
    parse_rate,
    privacy_label,
)
from fltorrent_hpc.errors import ConfigError, FLTorrentError


# ---------------------------------------------------------------------------------------------- sizes
@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ("4MiB", 4 * 2**20),
        ("256KiB", 256 * 1024),
        ("17.1GB", 17_100_000_000),
        ("1.5k", 1536),
        ("64 KiB", 65536),
        (" 4 MiB ", 4 * 2**20),
        ("2mib", 2 * 2**20),
        ("1TB", 10**12),
        ("1tib", 2**40),
        ("1024", 1024),
        ("1e3", 1000),
        ("10B", 10),
        ("0", 0),
        (1024, 1024),
        (2.0, 2),
    ],
)
def test_parse_bytes(text, expect):
    assert parse_bytes(text) == expect
    assert isinstance(parse_bytes(text), int)


@pytest.mark.parametrize("text", ["4XB", "abc", "-1", "", "MiB", "4 Mi B", "1,5MiB", -5])
def test_parse_bytes_rejects(text):
    with pytest.raises(ConfigError, match=r"size") as e:
        parse_bytes(text)
    if isinstance(text, str) and text:
        assert repr(text) in str(e.value) or text in str(e.value), "message should quote the bad input"
        assert "MiB" in str(e.value), "message should show an example of a valid size"


@settings(max_examples=60, deadline=None)
@given(
    st.integers(0, 10**6),
    st.sampled_from([("", 1), ("B", 1), ("KiB", 1024), ("MiB", 2**20), ("kB", 1000), ("GB", 10**9)]),
)
def test_parse_bytes_integer_units(value, unit):
    suffix, mult = unit
    assert parse_bytes(f"{value}{suffix}") == value * mult


# ---------------------------------------------------------------------------------------------- rates
@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ("10Gbps", 1.25e9),
        ("10 Gbps", 1.25e9),
        ("25.3Mbps", 25.3e6 / 8),
        ("15.5mbps", 15.5e6 / 8),
        ("8Kbps", 1000.0),
        ("800bps", 100.0),
        ("100MB/s", 1e8),
        ("1KiB/s", 1024.0),
        ("5", 5.0),
        (1e6, 1e6),
    ],
)
def test_parse_rate(text, expect):
    assert parse_rate(text) == pytest.approx(expect)


@pytest.mark.parametrize("text", ["10Gbit", "fast", "10Gbps/s", "-1Mbps", "1XB/s", 0, -3.0])
def test_parse_rate_rejects(text):
    with pytest.raises(ConfigError, match="rate|size"):  # "<size>/s" forms report the size part
        parse_rate(text)


def test_bug_parse_rate_accepts_zero_string():
    # Fixed bug: parse_rate(0) raises "rate must be > 0" but the strings "0Mbps", "0" and "0MB/s" parse to 0.0; a zero
    # link then fails deep inside simulate() with a ValueError (see test_cli_simulate's zero-link case).
    for text in ("0Mbps", "0", "0MB/s"):
        with pytest.raises(ConfigError, match="rate"):
            parse_rate(text)


# ---------------------------------------------------------------------------------------------- ranges
def test_parse_range():
    lo, hi = parse_range("7Gbps:10Gbps")
    assert (lo, hi) == (pytest.approx(7e9 / 8), pytest.approx(1.25e9))
    assert parse_range("15.5Mbps") == (pytest.approx(15.5e6 / 8),) * 2
    assert parse_range(("1MB/s", "2MB/s")) == (1e6, 2e6)
    assert parse_range(["3MB/s"]) == (3e6, 3e6)
    assert parse_range("1KiB:4KiB", parse_bytes) == (1024, 4096)


@pytest.mark.parametrize(("text", "msg"), [("10Gbps:7Gbps", "HIGH < LOW"), ("1:2:3", "LOW:HIGH"), ("1Gbps:x", "rate")])
def test_parse_range_rejects(text, msg):
    with pytest.raises(ConfigError, match=msg):
        parse_range(text)


# ---------------------------------------------------------------------------------------------- privacy
@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ("full", set(PRIVACY_MECHANISMS)),
        ("FULL", set(PRIVACY_MECHANISMS)),
        ("none", set()),
        ("", set()),
        ("spray,lags", {"spray", "lags"}),
        (" Spray , gating ", {"spray", "gating"}),
        ("gating,", {"gating"}),
        ({"lags"}, {"lags"}),
        (("spray", "gating"), {"spray", "gating"}),
        (frozenset(), set()),
    ],
)
def test_parse_privacy(text, expect):
    got = parse_privacy(text)
    assert isinstance(got, frozenset) and got == expect


@pytest.mark.parametrize("text", ["spray,foo", "all", ["lags", "tor"]])
def test_parse_privacy_rejects(text):
    with pytest.raises(ConfigError, match="unknown privacy mechanism") as e:
        parse_privacy(text)
    assert "spray" in str(e.value)  # the message lists the valid choices


@settings(max_examples=30, deadline=None)
@given(st.sets(st.sampled_from(PRIVACY_MECHANISMS)))
def test_privacy_label_round_trip(mechs):
    label = privacy_label(frozenset(mechs))
    assert parse_privacy(label) == frozenset(mechs)
    if len(mechs) == 3:
        assert label == "full"
    if not mechs:
        assert label == "none"


# ---------------------------------------------------------------------------------------------- SwarmConfig
def test_paper_defaults():
    c = SwarmConfig()
    assert (c.degree, c.spray_ratio, c.lag_slots, c.cover, c.kappa, c.tau) == (10, 0.2, 3, 0.10, 1, 4)
    assert c.scheduler == "gff" and c.overlay == "random" and c.cover_scope == "swarm"
    assert c.privacy == frozenset(PRIVACY_MECHANISMS)
    assert c.slot_seconds == 1.0 and c.chunk_bytes == 4 * 2**20


def test_fields_accept_strings_at_the_edges():
    c = SwarmConfig(chunk_bytes="256KiB", privacy="spray,lags")
    assert c.chunk_bytes == 262144 and c.privacy == {"spray", "lags"}
    assert SwarmConfig(privacy="none").privacy == frozenset()


@pytest.mark.parametrize(
    ("field", "value", "msg"),
    [
        ("degree", 0, "degree"),
        ("overlay", "ring", "overlay"),
        ("chunk_bytes", 0, "chunk_bytes"),
        ("chunk_bytes", "4XB", "cannot parse size"),
        ("spray_ratio", 1.0, "spray_ratio"),
        ("spray_ratio", -0.1, "spray_ratio"),
        ("lag_slots", 0, "lag_slots"),
        ("cover", 1.5, "cover"),
        ("cover_scope", "global", "cover_scope"),
        ("kappa", 0, "kappa"),
        ("scheduler", "fifo", "scheduler"),
        ("tau", 0, "tau"),
        ("bt_passes", 0, "bt_passes"),
        ("bt_window", 0, "bt_window"),
        ("bt_window", 1025, "bt_window"),
        ("bt_decisions", "stages", "bt_decisions"),
        ("slot_seconds", 0.0, "slot_seconds"),
        ("timeout_s", -1.0, "timeout_s"),
        ("deadline_stages", -1, "deadline"),
        ("warmup_deadline_stages", -2, "deadline"),
        ("privacy", "spray,tor", "privacy"),
    ],
)
def test_bad_values_raise_config_error(field, value, msg):
    with pytest.raises(ConfigError, match=msg) as e:
        SwarmConfig(**{field: value})
    assert isinstance(e.value, ValueError) and isinstance(e.value, FLTorrentError)
    with pytest.raises(ConfigError, match=msg):
        SwarmConfig().replace(**{field: value})  # replace validates too


def test_cover_threshold():
    c = SwarmConfig()
    assert c.cover_threshold(30, 206) == 618  # 10% of |C| = 30 * 206 (exact, no float round-up to 619)
    assert c.cover_threshold(100, 206) == 2060  # PAPER.md §2.0
    assert c.cover_threshold(500, 206) == 10300
    u = SwarmConfig(cover_scope="update")
    assert u.cover_threshold(100, 206) == 21  # k = ceil(0.1 * 206), PAPER.md §2.0 "k ~ 21"
    assert SwarmConfig(cover=0.0).cover_threshold(10, 10) == 1  # at least one chunk
    assert SwarmConfig(cover=1.0).cover_threshold(4, 3) == 12


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 500), st.integers(1, 300), st.sampled_from([0.05, 0.1, 0.15, 0.2, 0.3, 0.5]))
def test_cover_threshold_is_ceiling(n, K, cover):
    k = SwarmConfig(cover=cover).cover_threshold(n, K)
    assert k == max(1, math.ceil(round(cover * n * K, 9)))


def test_to_dict_is_json_and_labels_privacy():
    d = SwarmConfig(privacy="spray,gating", extra={"x": 1}).to_dict()
    assert d["privacy"] == "spray,gating" and "extra" not in d
    assert json.loads(json.dumps(d))["degree"] == 10
    assert SwarmConfig(privacy="full").to_dict()["privacy"] == "full"


def test_config_is_frozen_and_comparable():
    c = SwarmConfig()
    with pytest.raises(AttributeError):
        c.degree = 3
    assert c == SwarmConfig(extra={"ignored": True})  # extra does not take part in equality
    assert c.replace(degree=4) != c and c.replace(degree=4).degree == 4


# ---------------------------------------------------------------------------------------------- environment
def test_from_env_overrides():
    env = {
        "FLTORRENT_CHUNK_BYTES": "1MiB",
        "FLTORRENT_PRIVACY": "spray,lags",
        "FLTORRENT_DEGREE": "6",
        "FLTORRENT_SPRAY_RATIO": "0.3",
        "FLTORRENT_SLOT_SECONDS": "2",
        "FLTORRENT_CONSENSUS": "false",
        "FLTORRENT_UPLINK": "10Gbps",
        "FLTORRENT_DOWNLINK": "100MB/s",
        "FLTORRENT_SCHEDULER": "random-ff",
        "FLTORRENT_OVERLAY": "expander",
        "FLTORRENT_TRACE": "/tmp/x.h5",
        "FLTORRENT_EXTRA": "{}",  # not a knob: ignored
        "UNRELATED": "1",
    }
    c = SwarmConfig.from_env(environ=env)
    assert c.chunk_bytes == 2**20 and c.privacy == {"spray", "lags"} and c.degree == 6
    assert c.spray_ratio == 0.3 and c.slot_seconds == 2.0 and isinstance(c.slot_seconds, float)
    assert c.consensus is False and c.uplink == 1.25e9 and c.downlink == 1e8
    assert c.scheduler == "random-ff" and c.overlay == "expander" and c.trace == "/tmp/x.h5"
    assert c.extra == {}
    assert c.tau == 4 and c.kappa == 1  # untouched fields keep their defaults


def test_from_env_keeps_base_and_bool_forms():
    base = SwarmConfig(degree=7, tau=2)
    assert SwarmConfig.from_env(base, environ={}) is base
    c = SwarmConfig.from_env(base, environ={"FLTORRENT_TAU": "3"})
    assert (c.degree, c.tau) == (7, 3)
    for raw in ("1", "true", "YES", "on"):
        assert SwarmConfig.from_env(environ={"FLTORRENT_CONSENSUS": raw}).consensus is True
    for raw in ("0", "false", "no", "off"):
        assert SwarmConfig.from_env(environ={"FLTORRENT_CONSENSUS": raw}).consensus is False


def test_from_env_reads_os_environ(monkeypatch):
    monkeypatch.setenv("FLTORRENT_COVER", "0.25")
    monkeypatch.setenv("FLTORRENT_SEED", "17")
    c = SwarmConfig.from_env()
    assert c.cover == 0.25 and c.seed == 17


@pytest.mark.parametrize(
    ("key", "raw", "msg"),
    [
        ("FLTORRENT_DEGREE", "ten", "FLTORRENT_DEGREE='ten'"),
        ("FLTORRENT_DEGREE", "0", "degree must be >= 1"),
        ("FLTORRENT_CHUNK_BYTES", "4XB", "FLTORRENT_CHUNK_BYTES='4XB'.*cannot parse size"),
        ("FLTORRENT_UPLINK", "fast", "FLTORRENT_UPLINK='fast'.*rate"),
        ("FLTORRENT_PRIVACY", "tor", "FLTORRENT_PRIVACY='tor'.*privacy"),
        ("FLTORRENT_SPRAY_RATIO", "lots", "FLTORRENT_SPRAY_RATIO"),
        ("FLTORRENT_SPRAY_RATIO", "1.5", "spray_ratio"),
        ("FLTORRENT_SCHEDULER", "fifo", "scheduler"),
    ],
)
def test_from_env_bad_values(key, raw, msg):
    with pytest.raises(ConfigError, match=msg):
        SwarmConfig.from_env(environ={key: raw})


def test_bug_from_env_bad_boolean_is_silently_false():
    # Fixed bug: SwarmConfig.from_env maps any boolean text that is not 1/true/yes/on to False, so a typo such as
    # FLTORRENT_CONSENSUS=ture or =maybe silently turns consensus off instead of raising ConfigError.
    with pytest.raises(ConfigError, match="FLTORRENT_CONSENSUS"):
        SwarmConfig.from_env(environ={"FLTORRENT_CONSENSUS": "maybe"})
