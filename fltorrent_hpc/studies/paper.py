"""The paper's published dissemination numbers (PAPER.md §3.3, §7.2-7.4, §7.7), typed in once.

Reports put each measured figure beside these.  Values tagged "figure" in PAPER.md were read off the
paper's plots (about ±0.5% of the axis range); values in bold there are printed in the paper's text.
Nothing measured by this project belongs here: our numbers come only from study files.
"""

from __future__ import annotations

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
