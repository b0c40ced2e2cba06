"""Federated data for the training job: scikit-learn's digits (ships with the package, no download) and seeded
IID / Dirichlet(alpha) splits across peers.

    data = load_digits(seed=0)                                   # identical on every rank
    parts = partition(data.y_train, n_peers=4, split="dir0.1", seed=0)
    x, y = data.x_train[parts[rank]], data.y_train[parts[rank]]

Every function is a pure function of its arguments: every rank computes the same split without talking to the
others, and a resumed run sees the same data.  The test set (20% by default, stratified) is held out before
splitting, identically on every rank.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

SPLITS_HELP = "iid, or dirALPHA / dirichlet:ALPHA for Dirichlet(alpha) label skew (e.g. dir0.1, dir0.5, dir1.0)"


@dataclass(frozen=True)
class FederatedData:
    """Train and held-out test tensors (features float32 in [0, 1], labels int64)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    n_classes: int
    name: str

    @property
    def n_features(self) -> int:
        return int(self.x_train.shape[1])


def load_digits(seed: int = 0, test_fraction: float = 0.2) -> FederatedData:
    """scikit-learn's 8x8 digits (1797 samples, 10 classes, 64 features scaled by 1/16 into [0, 1]).

    The test split is stratified and seeded, so it is the same on every rank and in every run with `seed`.
    """
    from sklearn.datasets import load_digits as _load
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    x, y = _load(return_X_y=True)
    x = (x / 16.0).astype(np.float32)  # pixel values are 0..16: a data-independent scaling
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    return FederatedData(
        torch.from_numpy(np.ascontiguousarray(x_tr)),
        torch.from_numpy(np.ascontiguousarray(y_tr).astype(np.int64)),
        torch.from_numpy(np.ascontiguousarray(x_te)),
        torch.from_numpy(np.ascontiguousarray(y_te).astype(np.int64)),
        10,
        "digits",
    )


def split_iid(n_samples: int, n_peers: int, seed: int) -> list[np.ndarray]:
    """A seeded random permutation cut into n_peers nearly equal parts (sizes differ by at most one)."""
    if n_peers < 1 or n_samples < n_peers:
        raise ValueError(f"cannot split {n_samples} samples across {n_peers} peers")
    perm = np.random.default_rng(seed).permutation(n_samples)
    return [np.sort(p).astype(np.int64) for p in np.array_split(perm, n_peers)]


def split_dirichlet(
    labels: np.ndarray | torch.Tensor,
    n_peers: int,
    alpha: float,
    seed: int,
    *,
    min_samples: int = 10,
    max_tries: int = 1000,
) -> list[np.ndarray]:
    """Label-skewed split: for every class c, proportions p_c ~ Dirichlet(alpha * 1_n) cut that class's samples
    across peers (the usual FL benchmark construction; smaller alpha = more skew).

    Draws are repeated (same seeded stream) until every peer holds at least `min_samples` samples, so no peer
    is empty; ValueError after `max_tries` draws.
    """
    y = np.asarray(labels.cpu().numpy() if isinstance(labels, torch.Tensor) else labels).reshape(-1)
    if alpha <= 0 or not np.isfinite(alpha):
        raise ValueError(f"Dirichlet alpha must be finite and > 0, got {alpha}")
    if n_peers < 1 or y.size < n_peers * min_samples:
        raise ValueError(f"cannot give {n_peers} peers {min_samples} samples each out of {y.size}")
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(n_peers)]
        for c in classes:
            idx = np.flatnonzero(y == c)
            rng.shuffle(idx)
            p = rng.dirichlet(np.full(n_peers, float(alpha)))
            cuts = np.floor(np.cumsum(p)[:-1] * idx.size).astype(np.int64)
            for i, s in enumerate(np.split(idx, cuts)):
                parts[i].append(s)
        out = [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
        if min(o.size for o in out) >= min_samples:
            return out
    raise ValueError(
        f"Dirichlet(alpha={alpha}) split over {n_peers} peers: no draw in {max_tries} gave every peer "
        f">= {min_samples} samples; lower min_samples or raise alpha"
    )


def parse_split(split: str) -> tuple[str, float]:
    """'iid' -> ('iid', 0); 'dir0.1', 'dir-0.1', 'dirichlet:0.5', 'dirichlet0.5' -> ('dirichlet', alpha)."""
    s = split.strip().lower()
    if s == "iid":
        return "iid", 0.0
    m = re.fullmatch(r"dir(?:ichlet)?[:=\-_]?([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)", s)
    if not m:
        raise ValueError(f"unknown split {split!r}: use {SPLITS_HELP}")
    return "dirichlet", float(m.group(1))


def partition(
    labels: np.ndarray | torch.Tensor, n_peers: int, split: str, seed: int, *, min_samples: int = 10
) -> list[np.ndarray]:
    """Indices of each peer's local samples (sorted, disjoint, covering every sample) for a split name."""
    kind, alpha = parse_split(split)
    n = int(labels.shape[0])
    if kind == "iid":
        return split_iid(n, n_peers, seed)
    return split_dirichlet(labels, n_peers, alpha, seed, min_samples=min_samples)


def label_histogram(labels: np.ndarray | torch.Tensor, parts: list[np.ndarray], n_classes: int) -> np.ndarray:
    """int64 [n_peers, n_classes]: how many samples of each class every peer holds."""
    y = np.asarray(labels.cpu().numpy() if isinstance(labels, torch.Tensor) else labels).reshape(-1)
    return np.stack([np.bincount(y[p], minlength=n_classes) for p in parts]).astype(np.int64)
