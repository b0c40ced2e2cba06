"""Device memory of one round: a single fp32 accumulator plus a bounded chunk arena; the rest spills to host.

A peer keeps every chunk it received, because other peers may request it until the round ends, but the
device only needs the chunks in flight (being received, sent or accumulated).  So the device budget is
fixed up front and does not grow with the number of peers:

    device_bytes = 4 * N  +  S * C            N = layout.numel (update elements)
                                              C = chunk_bytes
                                              S = arena_bytes // C  (slots, >= 1)

Nothing else of size O(update) is allocated on the device by a round: the peer's own chunks are packed
from its parameters into slots on demand (`kernels.pack_segments` with a byte range), and FedAvg writes
the average back in place (`kernels.finalize_fedavg_`).  When every slot is taken, the least recently
used chunk that is not pinned (in flight) moves to host memory, pinned where CUDA is present, and comes
back to a slot with `fetch` when it is needed on the device again.  Copies run on the current stream, so a
freed slot's next writer must be ordered after it (the NCCL transport waits on the current stream before
each stage).  Kernel work tables (32 B per 64 Ki
elements or 256 KiB of chunk) are the only other, transient, device allocations.

arena_bytes comes from the argument, else FLTORRENT_ARENA_BYTES ("512MiB", or a byte count), else
DEFAULT_ARENA_BYTES.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Hashable, Mapping
from dataclasses import dataclass

import torch

from ..config import parse_bytes
from ..errors import ConfigError, ShapeMismatchError

ARENA_ENV = "FLTORRENT_ARENA_BYTES"
DEFAULT_ARENA_BYTES = 256 * 2**20
"""64 slots of the default 4 MiB chunk: enough to keep a stage's transfers in flight on the device."""


def arena_bytes_from_env(arena_bytes: int | str | None = None, environ: Mapping[str, str] | None = None) -> int:
    """The arena size in bytes: explicit value, else FLTORRENT_ARENA_BYTES, else DEFAULT_ARENA_BYTES."""
    env = os.environ if environ is None else environ
    if arena_bytes is None:
        arena_bytes = env.get(ARENA_ENV, DEFAULT_ARENA_BYTES)
    try:
        return parse_bytes(arena_bytes)
    except ConfigError as e:
        raise ConfigError(f"{ARENA_ENV}: {e}") from e


def device_bytes_formula(numel: int, chunk_bytes: int, arena_bytes: int) -> int:
    """4 * numel + (arena_bytes // chunk_bytes) * chunk_bytes: what a round holds on the device."""
    return 4 * int(numel) + (int(arena_bytes) // int(chunk_bytes)) * int(chunk_bytes)


@dataclass(frozen=True)
class ArenaStats:
    """A snapshot of the accounting (bytes unless named otherwise)."""

    device_bytes: int
    acc_bytes: int
    arena_bytes: int
    slots: int
    resident: int
    spilled: int
    host_bytes: int
    peak_host_bytes: int
    spills: int
    fills: int


class ChunkArena:
    """The fp32 accumulator and the chunk slots of one round on `device`, with LRU spill to host.

    Chunks are keyed by any hashable (e.g. (source rank, chunk id)).  `alloc` hands out a slot to receive
    into, `put` copies a chunk in, `get` returns wherever the chunk is now, `fetch` brings it back to a
    slot, `pin` keeps it on the device while a transfer or kernel uses it, `release` forgets it.
    """

    def __init__(
        self,
        numel: int,
        chunk_bytes: int,
        device: torch.device | str = "cpu",
        arena_bytes: int | str | None = None,
        *,
        pin_host: bool | None = None,
        environ: Mapping[str, str] | None = None,
    ):
        self.device = torch.device(device)
        self.chunk_bytes = int(chunk_bytes)
        if self.chunk_bytes <= 0 or numel < 0:
            raise ConfigError(f"arena: chunk_bytes must be > 0 and numel >= 0 (got {chunk_bytes}, {numel})")
        want = arena_bytes_from_env(arena_bytes, environ)
        self.slots = want // self.chunk_bytes
        if self.slots < 1:
            raise ConfigError(f"arena of {want} B holds no {self.chunk_bytes} B chunk; set {ARENA_ENV} >= chunk_bytes")
        self.pin_host = self.device.type == "cuda" if pin_host is None else bool(pin_host)
        self.acc = torch.zeros(int(numel), dtype=torch.float32, device=self.device)
        self.slab = torch.empty(self.slots * self.chunk_bytes, dtype=torch.uint8, device=self.device)
        self._free = list(range(self.slots - 1, -1, -1))
        self._dev: OrderedDict[Hashable, tuple[int, int]] = OrderedDict()  # key -> (slot, nbytes), LRU first
        self._host: dict[Hashable, tuple[torch.Tensor, object]] = {}  # key -> (host tensor, copy-done event)
        self._pinned: set[Hashable] = set()
        self._host_bytes = self._peak_host = self._spills = self._fills = 0

    @classmethod
    def for_layout(cls, layout, chunk_bytes: int, device: torch.device | str = "cpu", **kw) -> ChunkArena:
        """Arena sized for a `layout.Layout` (accumulator of layout.numel elements)."""
        return cls(layout.numel, chunk_bytes, device, **kw)

    # accounting -------------------------------------------------------------------------------------
    @property
    def device_bytes(self) -> int:
        """Bytes this round holds on the device: exactly `device_bytes_formula(...)`, constant."""
        return self.acc.numel() * 4 + self.slab.numel()

    @property
    def host_bytes(self) -> int:
        return self._host_bytes

    def stats(self) -> ArenaStats:
        return ArenaStats(
            device_bytes=self.device_bytes,
            acc_bytes=self.acc.numel() * 4,
            arena_bytes=self.slab.numel(),
            slots=self.slots,
            resident=len(self._dev),
            spilled=len(self._host),
            host_bytes=self._host_bytes,
            peak_host_bytes=self._peak_host,
            spills=self._spills,
            fills=self._fills,
        )

    # slots ------------------------------------------------------------------------------------------
    def __contains__(self, key: Hashable) -> bool:
        return key in self._dev or key in self._host

    def __len__(self) -> int:
        return len(self._dev) + len(self._host)

    def on_device(self, key: Hashable) -> bool:
        return key in self._dev

    def _view(self, slot: int, nbytes: int) -> torch.Tensor:
        return self.slab[slot * self.chunk_bytes : slot * self.chunk_bytes + nbytes]

    def _check_len(self, nbytes: int) -> int:
        nbytes = int(nbytes)
        if not 0 <= nbytes <= self.chunk_bytes:
            raise ShapeMismatchError(f"chunk of {nbytes} B does not fit a {self.chunk_bytes} B slot")
        return nbytes

    def _take_slot(self) -> int:
        if self._free:
            return self._free.pop()
        for victim in self._dev:  # least recently used first
            if victim not in self._pinned:
                self._spill(victim)
                return self._free.pop()
        raise ConfigError(
            f"arena: all {self.slots} slots hold pinned (in-flight) chunks; raise {ARENA_ENV} "
            f"(now {self.slab.numel()} B) or keep fewer transfers in flight"
        )

    def _spill(self, key: Hashable) -> None:
        slot, nbytes = self._dev.pop(key)
        host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin_host)
        event = None
        if self.device.type == "cuda":
            host.copy_(self._view(slot, nbytes), non_blocking=self.pin_host)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
        else:
            host.copy_(self._view(slot, nbytes))
        self._host[key] = (host, event)
        self._free.append(slot)
        self._host_bytes += nbytes
        self._peak_host = max(self._peak_host, self._host_bytes)
        self._spills += 1

    def alloc(self, key: Hashable, nbytes: int | None = None, *, pin: bool = False) -> torch.Tensor:
        """A device slot of `nbytes` (default chunk_bytes) for `key`, e.g. to receive into; spills if full."""
        if key in self:
            raise ConfigError(f"arena: chunk {key!r} is already stored")
        nbytes = self._check_len(self.chunk_bytes if nbytes is None else nbytes)
        slot = self._take_slot()
        self._dev[key] = (slot, nbytes)
        if pin:
            self._pinned.add(key)
        return self._view(slot, nbytes)

    def put(self, key: Hashable, data: torch.Tensor, *, pin: bool = False) -> torch.Tensor:
        """Copy a chunk (1-D uint8, any device) into a slot; returns the slot view."""
        if data.dtype != torch.uint8 or data.dim() != 1:
            raise ShapeMismatchError(f"arena stores 1-D uint8 chunks, got {data.dtype} {tuple(data.shape)}")
        view = self.alloc(key, data.numel(), pin=pin)
        view.copy_(data, non_blocking=data.device == self.device)  # device copies are stream-ordered
        return view

    def get(self, key: Hashable) -> torch.Tensor:
        """The chunk where it is now: a device slot view, or its host copy (waited for) if spilled."""
        if key in self._dev:
            self._dev.move_to_end(key)
            slot, nbytes = self._dev[key]
            return self._view(slot, nbytes)
        if key not in self._host:
            raise KeyError(key)
        host, event = self._host[key]
        if event is not None:
            event.synchronize()
        return host

    def fetch(self, key: Hashable, *, pin: bool = False) -> torch.Tensor:
        """The chunk in a device slot, copying it back from host if it was spilled."""
        if key not in self._host:
            view = self.get(key)
            if pin:
                self._pinned.add(key)
            return view
        host, _ = self._host[key]
        slot = self._take_slot()
        del self._host[key]
        self._host_bytes -= host.numel()
        self._fills += 1
        self._dev[key] = (slot, host.numel())
        view = self._view(slot, host.numel())
        view.copy_(host, non_blocking=self.pin_host)  # the host allocator keeps `host` until the copy ran
        if pin:
            self._pinned.add(key)
        return view

    def pin(self, key: Hashable) -> None:
        """Keep a resident chunk on the device (a transfer or kernel is using its slot)."""
        if key not in self._dev:
            raise ConfigError(f"arena: cannot pin {key!r}, it is not on the device (fetch it first)")
        self._pinned.add(key)

    def unpin(self, key: Hashable) -> None:
        self._pinned.discard(key)

    def release(self, key: Hashable) -> None:
        """Forget a chunk (its slot or host copy is free for reuse)."""
        self._pinned.discard(key)
        if key in self._dev:
            slot, _ = self._dev.pop(key)
            self._free.append(slot)
        elif key in self._host:
            host, _ = self._host.pop(key)
            self._host_bytes -= host.numel()
        else:
            raise KeyError(key)

    def reset(self) -> None:
        """Empty the arena and zero the accumulator for the next round (the device memory is kept)."""
        self._dev.clear()
        self._host.clear()
        self._pinned.clear()
        self._free = list(range(self.slots - 1, -1, -1))
        self._host_bytes = 0
        self.acc.zero_()
