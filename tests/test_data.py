"""Digits loading and federated splits (fltorrent_hpc/data.py): seeded, disjoint, covering, skewed as asked."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fltorrent_hpc.studies.data import label_histogram, load_digits, parse_split, partition, split_dirichlet, split_iid


@pytest.fixture(scope="module")
def digits():
    return load_digits(seed=0)


def test_digits_shapes_and_held_out_split(digits):
    d = digits
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    assert d.x_train.shape[1] == 64 and d.n_features == 64 and d.n_classes == 10
    assert len(d.y_train) + len(d.y_test) == 1797
    assert len(d.y_test) == 360  # 20%, stratified
    assert float(d.x_train.min()) >= 0.0 and float(d.x_train.max()) <= 1.0
    counts = np.bincount(d.y_test.numpy(), minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: about 36 of each class


def test_digits_is_identical_for_a_seed_and_differs_across_seeds(digits):
    again = load_digits(seed=0)
    assert torch.equal(digits.x_test, again.x_test) and torch.equal(digits.y_train, again.y_train)
    other = load_digits(seed=1)
    assert not torch.equal(digits.y_test, other.y_test)


def _check_partition(parts, n_total, n_peers):
    assert len(parts) == n_peers
    allidx = np.concatenate(parts)
    assert allidx.size == n_total and np.unique(allidx).size == n_total  # disjoint and covering
    for p in parts:
        assert p.dtype == np.int64 and np.all(np.diff(p) > 0)


def test_iid_split_is_balanced_disjoint_and_seeded():
    parts = split_iid(1437, 4, seed=0)
    _check_partition(parts, 1437, 4)
    assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1
    assert all(np.array_equal(a, b) for a, b in zip(parts, split_iid(1437, 4, seed=0)))
    assert not np.array_equal(parts[0], split_iid(1437, 4, seed=1)[0])


@pytest.mark.parametrize("alpha", [0.1, 0.5, 1.0])
def test_dirichlet_split_is_disjoint_covering_seeded(digits, alpha):
    y = digits.y_train
    parts = split_dirichlet(y, 4, alpha, seed=0)
    _check_partition(parts, len(y), 4)
    assert min(len(p) for p in parts) >= 10
    again = split_dirichlet(y, 4, alpha, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def test_smaller_alpha_means_more_label_skew(digits):
    y = digits.y_train

    def skew(alpha):  # mean over peers of the total-variation distance of the label mix from uniform
        vals = []
        for seed in range(5):
            h = label_histogram(y, split_dirichlet(y, 4, alpha, seed=seed), 10).astype(float)
            p = h / h.sum(1, keepdims=True)
            vals.append(0.5 * np.abs(p - 0.1).sum(1).mean())
        return float(np.mean(vals))

    s01, s10, s_iid = skew(0.1), skew(1.0), None
    h = label_histogram(y, split_iid(len(y), 4, seed=0), 10).astype(float)
    s_iid = float(0.5 * np.abs(h / h.sum(1, keepdims=True) - 0.1).sum(1).mean())
    assert s01 > s10 > s_iid


def test_partition_names_and_errors(digits):
    y = digits.y_train
    assert parse_split("iid") == ("iid", 0.0)
    assert parse_split("dir0.1") == ("dirichlet", 0.1)
    assert parse_split("dirichlet:0.5") == ("dirichlet", 0.5)
    with pytest.raises(ValueError):
        parse_split("pathological")
    a = partition(y, 4, "dir0.5", seed=3)
    b = split_dirichlet(y, 4, 0.5, seed=3)
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    with pytest.raises(ValueError):
        split_dirichlet(y, 4, 0.0, seed=0)
    with pytest.raises(ValueError):
        split_iid(3, 4, seed=0)
    with pytest.raises(ValueError):
        split_dirichlet(y, 4, 0.1, seed=0, min_samples=400)


def test_label_histogram_counts(digits):
    y = digits.y_train
    parts = partition(y, 4, "iid", seed=0)
    h = label_histogram(y, parts, 10)
    assert h.shape == (4, 10) and h.sum() == len(y)
    assert np.array_equal(h.sum(0), np.bincount(y.numpy(), minlength=10))
