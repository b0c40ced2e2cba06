"""One small error hierarchy, so callers can catch fltorrent failures without catching everything."""

from __future__ import annotations


class FLTorrentError(RuntimeError):
    """Base class of every error fltorrent_hpc raises on purpose."""


class ConfigError(FLTorrentError, ValueError):
    """A knob has a bad value or a size/rate string cannot be parsed."""


class ShapeMismatchError(FLTorrentError, ValueError):
    """Ranks disagreed on the size, shape or dtype of what they contribute to a round."""


class PeerTimeoutError(FLTorrentError, TimeoutError):
    """A distributed wait ran past its timeout; the message names peer, round, stage and what was outstanding."""


class IntegrityError(FLTorrentError):
    """A chunk failed its hash check and could not be re-fetched from any other holder."""


class ProtocolError(FLTorrentError):
    """A peer sent a control message that does not fit the protocol (bad header, bad ids)."""


class StaleFrameError(ProtocolError):
    """A well-formed control frame of an earlier round, or an earlier stage of this round: a late or replayed
    frame that the reader discards (and keeps waiting), not a violation by a current peer."""


class LaunchError(FLTorrentError):
    """fltorrent was started without an MPI launcher or with an inconsistent rank layout."""


class TransportError(FLTorrentError):
    """The transport underneath failed (an MPI or NCCL error), wrapped so callers see one hierarchy."""


class UnsupportedError(FLTorrentError, ValueError):
    """An op, dtype, device or argument the fltorrent backend does not implement."""


class TruncationError(ShapeMismatchError):
    """A peer sent a message longer than the buffer posted for it (MPI_ERR_TRUNCATE): the sizes disagree."""


class NothingToAverageError(FLTorrentError):
    """A round's agreed set is empty or carries no weight, so there is no aggregate; raised on every rank.

    A training loop catches it to keep the round's starting model instead of failing the run.
    """
