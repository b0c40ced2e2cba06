"""torch ReduceOps as the group computes them: locally, in rank order, in the tensor's own dtype.

Every rank reduces the same bytes in the same order, so all ranks get the same bits (this is torch's
all_reduce contract, not FedAvg: FedAvg's fp32 accumulation lives in aggregate.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from ..errors import UnsupportedError

RED = dist.ReduceOp.RedOpType
SUPPORTED_OPS = frozenset(getattr(RED, n) for n in "SUM AVG PRODUCT MIN MAX BAND BOR BXOR PREMUL_SUM".split())


def reduce_op(opts: Any) -> tuple[Any, Any]:
    """(RedOpType, premul factor) from a ReduceOp, a RedOpType or an options object with .reduceOp."""
    if isinstance(opts, RED):
        return opts, None
    op = opts if isinstance(opts, dist.ReduceOp) else getattr(opts, "reduceOp", dist.ReduceOp.SUM)
    if isinstance(op, RED):
        return op, None
    kind = op.op
    factor = op.factor if kind == RED.PREMUL_SUM else None
    return kind, factor


def check_reduce(kind: Any, factor: Any, dtype: torch.dtype, what: str) -> None:
    """UnsupportedError unless `kind` is defined for `dtype` (checked before any rank starts the op)."""
    floating = dtype.is_floating_point or dtype.is_complex
    if kind in (RED.AVG, RED.PREMUL_SUM) and not floating:
        raise UnsupportedError(f"{what}: ReduceOp.{kind.name} needs a floating dtype, got {dtype}")
    if kind in (RED.BAND, RED.BOR, RED.BXOR) and floating:
        raise UnsupportedError(f"{what}: ReduceOp.{kind.name} needs an integer or bool dtype, got {dtype}")
    if kind in (RED.MIN, RED.MAX) and dtype.is_complex:
        raise UnsupportedError(f"{what}: ReduceOp.{kind.name} is undefined for complex dtype {dtype}")
    if kind == RED.PREMUL_SUM:
        if factor is None or (isinstance(factor, torch.Tensor) and factor.numel() != 1):
            raise UnsupportedError(f"{what}: PREMUL_SUM needs a scalar factor")
    if kind not in SUPPORTED_OPS:
        raise UnsupportedError(f"{what}: unsupported ReduceOp {kind}")


def reduce_into(acc: torch.Tensor, parts: Sequence[torch.Tensor], kind: Any, factor: Any, n: int) -> torch.Tensor:
    """Reduce parts (one per rank, rank order) in their own dtype; the same bits on every rank."""
    with torch.no_grad():
        if kind == RED.PREMUL_SUM:
            f = factor.item() if isinstance(factor, torch.Tensor) else factor
            acc.copy_(parts[0] * f)
            for p in parts[1:]:
                acc.add_(p * f)
            return acc
        acc.copy_(parts[0])
        for p in parts[1:]:
            if kind in (RED.SUM, RED.AVG):
                acc.add_(p)
            elif kind == RED.PRODUCT:
                acc.mul_(p)
            elif kind == RED.MIN:
                torch.minimum(acc, p, out=acc)
            elif kind == RED.MAX:
                torch.maximum(acc, p, out=acc)
            elif kind == RED.BAND:
                acc.bitwise_and_(p)
            elif kind == RED.BOR:
                acc.bitwise_or_(p)
            elif kind == RED.BXOR:
                acc.bitwise_xor_(p)
        if kind == RED.AVG:
            acc.div_(n)
        return acc
