"""The FLTorrent round, sans-IO: overlay, spray, lags, gating, schedulers, BitTorrent, max-flow bound.

No MPI, no torch, no clock.  `SwarmRound` takes the round's state and returns the next stage's
transfers; it is told which transfers completed.  The simulator and the MPI engine drive the same code.
"""

from .overlay import Overlay, build_overlay
from .round import SwarmRound
from .stage import Stage

__all__ = ["Overlay", "Stage", "SwarmRound", "build_overlay"]
