"""The Transport contract, on real MPI ranks: the MPI transport and the fault-injecting wrapper (with no
fault to inject) must behave alike; then each fault the wrapper injects, seen from the receiving side.

The checks live in transport_contract.py, shared with the torch-native transport's run under torchrun
(tests/torchrun/test_torch_transport.py).

.venv/bin/mpiexec -n 4 .venv/bin/python -m pytest --with-mpi -q tests/mpi/test_transport.py   (any world size)
"""

from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI
from transport_contract import CONTRACT, FAULTS, KINDS, Harness

from fltorrent_hpc.transport.mpi import MPITransport

pytestmark = [pytest.mark.mpi(min_size=1), pytest.mark.timeout(60)]

COMM = MPI.COMM_WORLD


def agree(flag: bool) -> bool:
    """True only if every rank's flag is True (assert after all ranks agree, so no rank hangs)."""
    v = np.array([1 if flag else 0], dtype=np.int32)
    out = np.empty(1, dtype=np.int32)
    COMM.Allreduce(v, out, op=MPI.MIN)
    return bool(out[0])


H = Harness(COMM.Get_rank(), COMM.Get_size(), lambda: MPITransport(COMM), agree, COMM.Barrier)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("check", CONTRACT, ids=lambda f: f.__name__)
def test_contract(check, kind):
    assert H.agree(check(H, kind))


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("check", FAULTS, ids=lambda f: f.__name__)
def test_fault(check):
    assert H.agree(check(H))
