"""Where leases sit: which lease holds each slice of each device, and where a call fits.

The scheduler's lock guards a Placement: none of its methods locks or
waits. schedule() is the policy of zerogpu.schedule.scheduler's docstring:
waiting calls in policy order, backfill around the one reservation for the
first xlarge call, and idle warm workers' leases claimed (to be evicted)
when nothing else is free.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

from ..cuda.devices import Device
from .leases import EVICTING, PARKED, RELEASING, RUNNING, Held, Lease, LeaseRequest, Waiter
from .policy import Policy
from .quota import Owner, Reservation


class Placement:
    """The devices' slices and the leases held on them."""

    def __init__(self, devices: list[Device], policy: Policy) -> None:
        self.devices = devices
        self.policy = policy
        # cells[device][slot]: the id of the lease on that slice, None when free.
        self.cells: list[list[int | None]] = [[None] * policy.large_per_gpu for _ in devices]
        self.held: dict[int, Held] = {}

    def busy(self) -> int:
        """How many slices a lease holds."""
        return sum(cell is not None for row in self.cells for cell in row)

    def parked_for(self, request: LeaseRequest, owner: Hashable) -> Held | None:
        if request.key is None:
            return None
        for held in self.held.values():
            parked = held.lease.request
            if (held.state == PARKED and held.owner == owner and parked.key == request.key
                    and parked.size == request.size):
                return held
        return None

    def is_free(self, device: int, slot: int) -> bool:
        return self.cells[device][slot] is None

    def state_at(self, device: int, slot: int) -> str | None:
        lease_id = self.cells[device][slot]
        return None if lease_id is None else self.held[lease_id].state

    def spot(self, size: str, usable: Callable[[int, int], bool], reserved: dict[int, float],
              duration: float, now: float) -> tuple[int, list[int]] | None:
        """Where a call of `size` fits using cells for which `usable` holds.

        An xlarge call needs every slice of a device not reserved for another
        call. A large call takes a slice of the fullest device that has one
        (keeping whole devices free for xlarge calls), and may use a reserved
        device only if it ends before that device drains.
        """
        slots = range(self.policy.large_per_gpu)
        if size == "xlarge":
            for device in range(len(self.devices)):
                if device not in reserved and all(usable(device, s) for s in slots):
                    return device, list(slots)
            return None
        best: tuple[int, int] | None = None
        best_free = 0
        for device in range(len(self.devices)):
            if device in reserved and now + duration > reserved[device]:
                continue
            free = [s for s in slots if usable(device, s)]
            if free and (best is None or len(free) < best_free):
                best, best_free = (device, free[0]), len(free)
        return (best[0], [best[1]]) if best is not None else None

    def drain_time(self, device: int, now: float) -> float:
        """When every call on `device` will have reached its duration."""
        ends = [now]
        for lease_id in self.cells[device]:
            if lease_id is not None and self.held[lease_id].state in (RUNNING, RELEASING):
                held = self.held[lease_id]
                ends.append(held.since + held.lease.request.duration)
        return max(ends)

    def schedule(self, waiters: dict[int, Waiter], now: float) -> tuple[list[Waiter], list[Held]]:
        """Serve `waiters` in policy order; return those granted (taken out of `waiters`) and the leases to evict."""
        granted: list[Waiter] = []
        evicted: list[Held] = []
        claimed: set[tuple[int, int]] = set()
        reserved: dict[int, float] = {}
        xlarge_reserved = False

        def free(d: int, s: int) -> bool:
            return self.cells[d][s] is None and (d, s) not in claimed

        def coming(d: int, s: int) -> bool:
            return (d, s) not in claimed and self.state_at(d, s) in (None, EVICTING)

        def reclaimable(d: int, s: int) -> bool:
            return (d, s) not in claimed and self.state_at(d, s) in (None, EVICTING, PARKED)

        for waiter in sorted(waiters.values(), key=lambda w: w.priority(self.policy, now)):
            request = waiter.request
            warm = self.parked_for(request, waiter.owner)
            if warm is not None and not any(cell in claimed for cell in warm.cells):
                self.grant_warm(waiter, warm, now)
                del waiters[waiter.seq]
                granted.append(waiter)
                continue
            spot = self.spot(request.size, free, reserved, request.duration, now)
            if spot is not None:
                self.grant(waiter, spot, now)
                del waiters[waiter.seq]
                granted.append(waiter)
                continue
            # Capacity on its way back, or held by idle warm workers: claim it.
            spot = (self.spot(request.size, coming, reserved, request.duration, now)
                    or self.spot(request.size, reclaimable, reserved, request.duration, now))
            if spot is not None:
                device, slots = spot
                self.claim(device, slots, claimed, evicted)
                if request.size == "xlarge":
                    reserved[device] = now
                continue
            if request.size == "xlarge" and not xlarge_reserved:
                xlarge_reserved = True
                candidates = [d for d in range(len(self.devices)) if d not in reserved]
                if candidates:
                    device = min(candidates, key=lambda d: (self.drain_time(d, now), d))
                    reserved[device] = self.drain_time(device, now)
                    parked = [s for s in range(self.policy.large_per_gpu)
                              if (device, s) not in claimed and self.state_at(device, s) == PARKED]
                    self.claim(device, parked, claimed, evicted)
        return granted, evicted

    def claim(self, device: int, slots: list[int], claimed: set, evicted: list[Held]) -> None:
        for slot in slots:
            claimed.add((device, slot))
            lease_id = self.cells[device][slot]
            if lease_id is not None and self.held[lease_id].state == PARKED:
                held = self.held[lease_id]
                held.state = EVICTING
                evicted.append(held)

    def grant(self, waiter: Waiter, spot: tuple[int, list[int]], now: float) -> None:
        held = self.new_held(waiter.lease_id, waiter.request, waiter.owner, waiter.process, spot, now)
        self.occupy(held)
        waiter.lease = held.lease

    def grant_warm(self, waiter: Waiter, held: Held, now: float) -> None:
        self.rerun(held, waiter.request, now)
        held.park = None
        waiter.lease = held.lease

    def rerun(self, held: Held, request: LeaseRequest, now: float) -> None:
        """A parked lease runs `request` of the same key: the lease is handed back warm."""
        held.state = RUNNING
        held.since = now
        held.lease = Lease(held.lease.id, held.lease.device, held.lease.slot, held.lease.memory_fraction,
                           request, warm=True)

    def new_held(self, lease_id: int, request: LeaseRequest, owner: Hashable, process: Owner,
                 spot: tuple[int, list[int]], now: float) -> Held:
        device, slots = spot
        lease = Lease(lease_id, self.devices[device], slots[0] if request.size == "large" else None,
                      self.fraction(request.size), request)
        return Held(lease, owner, process, RUNNING, now, [(device, s) for s in slots])

    def fraction(self, size: str) -> float:
        return self.policy.memory_fraction if size == "large" else 1.0

    def cells_of(self, row: Reservation) -> list[tuple[int, int]] | None:
        if row.device is None or not 0 <= row.device < len(self.devices):
            return None
        if row.size == "xlarge":
            return [(row.device, s) for s in range(self.policy.large_per_gpu)]
        if row.slot is None or not 0 <= row.slot < self.policy.large_per_gpu:
            return None
        return [(row.device, row.slot)]

    def occupy(self, held: Held) -> None:
        for device, slot in held.cells:
            self.cells[device][slot] = held.lease.id
        self.held[held.lease.id] = held

    def vacate(self, held: Held) -> None:
        for device, slot in held.cells:
            if self.cells[device][slot] == held.lease.id:
                self.cells[device][slot] = None
        if self.held.get(held.lease.id) is held:
            del self.held[held.lease.id]
