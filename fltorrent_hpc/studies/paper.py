"""The paper's published dissemination numbers (PAPER.md §3.3, §7.2-7.4, §7.7), typed in once.

Reports put each measured figure beside these.  Values tagged "figure" in PAPER.md were read off the
paper's plots (about ±0.5% of the axis range); values in bold there are printed in the paper's text.
Nothing measured by this project belongs here: our numbers come only from study files.

The paper's simulation setup (chunk size, update size, link ranges) is the simulator's default, so it is
defined once in `runtime.simulator` (a lower layer) and only re-exported here.
"""

from __future__ import annotations

from ..runtime.simulator import PAPER_CHUNK as PAPER_CHUNK
from ..runtime.simulator import PAPER_DOWNLINK as PAPER_DOWNLINK
from ..runtime.simulator import PAPER_UPDATE as PAPER_UPDATE
from ..runtime.simulator import PAPER_UPLINK as PAPER_UPLINK

# §6 setup: one update of 206 chunks of 256 KiB; residential uplinks / downlinks drawn uniformly in these ranges
PAPER_CHUNKS = PAPER_UPDATE // PAPER_CHUNK

# LLM stress setup (DESIGN.md, where the paper is silent): 64 peers, 64 MiB chunks, 7-10 Gbps symmetric links,
# bf16 update sizes
LLM_PEERS = 64
LLM_CHUNK = "64MiB"
LLM_LINKS = ("7Gbps", "10Gbps")
LLM_MODELS: dict[str, str] = {
    "Gemma-7B": "17.1GB",
    "DeepSeek-R1-14B": "29.5GB",
    "Qwen2.5-32B": "65.5GB",
    "Llama-3.3-70B": "141GB",
}

# Table III (full privacy, GreedyFastestFirst, 206 x 256 KiB update): n -> figures
TABLE3: dict[int, dict[str, float]] = {
    100: {"warmup_s": 243, "warmup_share": 0.124, "utilization": 0.805, "round_s": 1965},
    200: {"warmup_s": 472, "warmup_share": 0.115, "utilization": 0.763, "round_s": 4118},
    300: {"warmup_s": 730, "warmup_share": 0.117, "utilization": 0.771, "round_s": 6229},
    400: {"warmup_s": 939, "warmup_share": 0.115, "utilization": 0.794, "round_s": 8192},
    500: {"warmup_s": 1229, "warmup_share": 0.117, "utilization": 0.754, "round_s": 10501},
}

# Fig. 4 (n = 100): privacy label (our SwarmConfig spelling) -> (paper label, BT phase s, warm-up s, total s).
# K = cover-set gating, PR = pre-round spray, TL = time lags.
ABLATION: dict[str, tuple[str, float, float, float]] = {
    "none": ("Base (BT-only)", 1891.75, 0.0, 1891.75),
    "gating": ("K", 1687.3, 238.78, 1926.1),
    "spray": ("PR", 1739.0, 202.2, 1941.2),
    "lags": ("TL", 1756.2, 201.0, 1957.2),
    "spray,gating": ("K+PR", 1704.5, 241.5, 1946.0),
    "lags,gating": ("K+TL", 1670.1, 239.9, 1910.0),
    "spray,lags": ("PR+TL", 1773.4, 203.5, 1976.9),
    "full": ("Full (K+PR+TL)", 1721.75, 243.32, 1965.07),
}
ABLATION_FULL_OVERHEAD = 0.039  # text: full privacy round +3.9% over BitTorrent-only

# Fig. 5 (n = 100): cover threshold K -> warm-up duration (s)
COVER: dict[float, float] = {
    0.05: 99.5,
    0.10: 238.8,
    0.15: 348.2,
    0.20: 441.1,
    0.25: 528.1,
    0.30: 668.6,
    0.40: 861.8,
    0.50: 1084.7,
}

# Fig. 3: scheduler -> (warm-up end stage, end time s, mean utilisation over its own warm-up)
SCHEDULERS: dict[str, tuple[float, float, float]] = {
    "maxflow": (56, float("nan"), 0.885),
    "gff": (93, 106, 0.764),
    "random-ff": (106, 117, 0.822),
    "random-fifo": (122, 130, 0.748),
    "flooding": (125, 131, 0.725),
}
SCHEDULER_LABELS = {
    "gff": "GreedyFastestFirst",
    "random-ff": "RandomFastestFirst",
    "random-fifo": "RandomFIFO",
    "flooding": "Flooding",
    "maxflow": "max-flow schedule (stage-wise bound)",
}
GFF_OF_MAXFLOW = 0.92  # abstract/conclusion: GFF attains about 92% of the max-flow-style bound (metric unstated)

# Fig. 8 (7-10 Gbps): model -> (BitTorrent-only s, full s, overhead printed in the text)
LLM: dict[str, tuple[float, float, float]] = {
    "Gemma-7B": (1174, 1291, 0.0997),
    "DeepSeek-R1-14B": (2923, 3116, 0.0660),
    "Qwen2.5-32B": (5104, 5466, 0.0709),
    "Llama-3.3-70B": (12153, 13368, 0.1001),
}

# ---------------------------------------------------------------------------- privacy (PAPER.md §7.5-7.6)
# Max ASR per attack, in `privacy.attacks.PAPER_ATTACKS` order (sequence, count, cluster).
# §7.5 (Fig. 6, n = 100, m = 10); "both" = pre-round + time-lag, which the paper's Fig. 7 calls full defences
# (11.25% at m = 10), so it is set beside our "full" (spray + lags + gating).
ASR_ABLATION: dict[str, tuple[float, float, float]] = {
    "none": (1.00, 1.00, 1.00),
    "spray": (0.141, 0.099, 0.133),
    "lags": (0.689, 0.660, 0.557),
    "full": (0.112, 0.068, 0.017),
}
# §7.6 (Fig. 7, full defences). (a) and (b) give one "max ASR" curve without naming the attack; it matches
# Fig. 6's Sequence value at m = 10, so it is set beside Sequence.
ASR_DEGREE: dict[int, float] = {5: 0.2699, 10: 0.1125, 15: 0.0724, 20: 0.0520, 25: 0.0429}
ASR_SPRAY: dict[float, float] = {0.1: 0.1143, 0.2: 0.1125, 0.3: 0.1132, 0.4: 0.1119, 0.5: 0.1127}
ASR_PEERS: dict[int, tuple[float, float, float]] = {
    100: (0.1090, 0.0558, 0.0153),
    200: (0.1008, 0.0853, 0.0261),
    300: (0.0940, 0.0787, 0.0414),
    400: (0.0820, 0.0732, 0.0411),
    500: (0.0731, 0.0678, 0.0417),
}
ASR_COALITION: dict[int, tuple[float, float]] = {  # coalition size a -> (any succeeds, per-attacker average)
    5: (0.1356, 0.1131),
    10: (0.1713, 0.1198),
    15: (0.2096, 0.1256),
    20: (0.2547, 0.1331),
    25: (0.3082, 0.1432),
}
