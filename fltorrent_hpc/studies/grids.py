"""The built-in studies: the paper's grids (Table III, Figs. 3, 4, 5, 8), the privacy study, `beyond`, and
`unlinkability` (issue 18).

Every built-in study is listed in `BUILTIN` and registered by `studies()`; nothing is discovered by import
side effects, and a study module that fails to import fails loudly.
"""

from __future__ import annotations

from typing import Any

from ..config import SCHEDULERS, parse_bytes
from . import paper
from .derive import derive_ablation, derive_beyond, derive_cover, derive_llm, derive_schedulers, derive_table3
from .paper import PAPER_CHUNK, PAPER_CHUNKS, PAPER_DOWNLINK, PAPER_UPLINK
from .privacy_sweeps import PRIVACY_STUDY
from .registry import STUDIES, GridArgs, Point, Study, points_for, register
from .runner import mid_round_stage
from .unlinkability import UNLINK_STUDY

MINI_CHUNKS = 24  # chunks per update in --mini grids: keeps every mini round well under a second


def paper_setup(mini: bool, **over: Any) -> dict[str, Any]:
    """The paper's §6 defaults (206 x 256 KiB update, residential links, m = 10, full privacy under the paper's
    protocol, GFF)."""
    chunks = MINI_CHUNKS if mini else PAPER_CHUNKS
    base = {
        "update_bytes": chunks * PAPER_CHUNK,
        "chunk_bytes": PAPER_CHUNK,
        "uplink": list(PAPER_UPLINK),
        "downlink": list(PAPER_DOWNLINK),
        "degree": 10,
        "privacy": "full",
        "protocol": "paper",
        "scheduler": "gff",
    }
    base.update(over)
    return base


def _grid_table3(a: GridArgs) -> list[Point]:
    sizes = (10, 20, 30) if a.mini else tuple(paper.TABLE3)
    return [p for n in sizes for p in points_for(f"n{n}", a, {"n": n}, peers=n, **paper_setup(a.mini))]


ABLATION_CONFIGS = tuple(paper.ABLATION)  # Fig. 4: none, each mechanism, pairs, full


def _grid_ablation(a: GridArgs) -> list[Point]:
    n = 16 if a.mini else 100
    return [
        p
        for priv in ABLATION_CONFIGS
        for p in points_for(
            priv.replace(",", "+"), a, {"privacy": priv, "n": n}, peers=n, **paper_setup(a.mini, privacy=priv)
        )
    ]


def _grid_cover(a: GridArgs) -> list[Point]:
    n = 16 if a.mini else 100
    ks = (0.05, 0.10, 0.20) if a.mini else tuple(paper.COVER)
    return [
        p
        for k in ks
        for p in points_for(f"K{round(k * 100):02d}", a, {"cover": k, "n": n}, peers=n, **paper_setup(a.mini, cover=k))
    ]


def _grid_schedulers(a: GridArgs) -> list[Point]:
    n = 16 if a.mini else 100
    pts = []
    for s in SCHEDULERS:
        extra = {"maxflow": True} if s == "gff" else {}
        pts += points_for(
            s, a, {"scheduler": s, "n": n}, peers=n, warmup_only=True, **paper_setup(a.mini, scheduler=s), **extra
        )
    return pts


def _grid_llm(a: GridArgs) -> list[Point]:
    n = 8 if a.mini else paper.LLM_PEERS
    scale = 64 if a.mini else 1  # --mini: updates 64x smaller (4..33 chunks per peer)
    pts = []
    for model, size in paper.LLM_MODELS.items():
        nbytes = parse_bytes(size) // scale
        for mode in ("none", "full"):
            pts += points_for(
                f"{model}_{mode}",
                a,
                {"model": model, "mode": mode, "size": size},
                peers=n,
                update_bytes=nbytes,
                chunk_bytes=paper.LLM_CHUNK,
                uplink=list(paper.LLM_LINKS),
                downlink=list(paper.LLM_LINKS),
                degree=10,
                privacy=mode,
                protocol="paper",
                scheduler="gff",
            )
    return pts


def _grid_beyond(a: GridArgs) -> list[Point]:
    scale = (24, 30) if a.mini else (1000, 2000)
    over_n = (20,) if a.mini else (100, 500)
    churn_n = 16 if a.mini else 100
    leaves = (0.1, 0.3) if a.mini else (0.1, 0.2, 0.3)
    pts = []
    for n in scale:
        pts += points_for(
            f"scale_n{n}", a, {"part": "scale", "n": n, "overlay": "random"}, peers=n, **paper_setup(a.mini)
        )
    for n in over_n:
        for ov in ("random", "expander"):
            pts += points_for(
                f"overlay_{ov}_n{n}",
                a,
                {"part": "overlay", "n": n, "overlay": ov},
                peers=n,
                spectrum=True,
                **paper_setup(a.mini, overlay=ov),
            )
    for ov in ("random", "expander"):
        for f in leaves:
            for s in a.seeds:
                prm = {"peers": churn_n, **paper_setup(a.mini, overlay=ov), "leave_fraction": f, "seed": s}
                prm["leave_stage"] = mid_round_stage(prm)
                g = f"churn_{ov}_{round(f * 100)}pct"
                pts.append(
                    Point(
                        f"{g}_s{s}", g, s, prm, {"part": "churn", "n": churn_n, "overlay": ov, "leave": f, "group": g}
                    )
                )
    return pts


BUILTIN: tuple[Study, ...] = (
    Study("table3", "Scaling with n (full privacy, GreedyFastestFirst)", "Table III", _grid_table3, derive_table3),
    Study("ablation", "Round cost of each privacy mechanism (n = 100)", "Fig. 4", _grid_ablation, derive_ablation),
    Study("cover", "Warm-up duration against the cover threshold K (n = 100)", "Fig. 5", _grid_cover, derive_cover),
    Study(
        "schedulers",
        "Warm-up schedulers against the stage max-flow bound (n = 100)",
        "Fig. 3",
        _grid_schedulers,
        derive_schedulers,
    ),
    Study("llm", "LLM-size updates over 7-10 Gbps links (64 peers, 64 MiB chunks)", "Fig. 8", _grid_llm, derive_llm),
    PRIVACY_STUDY,
    Study(
        "beyond",
        "Beyond the paper: n = 1000-2000, expander vs random overlays, churn",
        "(new)",
        _grid_beyond,
        derive_beyond,
    ),
    UNLINK_STUDY,
)


def studies() -> dict[str, Study]:
    """Every study by name: the built-ins (registered on first use) and any added with `register`."""
    for s in BUILTIN:
        if s.name not in STUDIES:
            register(s)
    return STUDIES
