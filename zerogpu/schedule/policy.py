"""The rules of sharing: what a call may ask for, what it costs, and who goes first.

Quotas are GPU seconds per identity per UTC day, counted in `large` seconds:
a `large` call holds half a GPU, an `xlarge` call a whole one and costs twice
as much. The visitor tiers follow ZeroGPU's published daily quotas; the
app's own account (tier `app`, the calls made with no visitor's identity)
has none, and no longest call, unless ZEROGPU_QUOTA names `app=SECONDS`.

Who goes first is a sort key (smaller first): tier (pro, then free and app,
then anonymous), then quota left (more first), then the duration asked for
(shorter first), then arrival. Waiting lifts a call one tier for every
`aging` seconds waited, so a call that arrived at `t` can only be overtaken
by calls that arrived before `t + (tier gap + 1) * aging`: nothing starves.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from .. import settings
from ..errors import InvalidArgument
from ..identity import APP_TIER, TIERS
from ..units import check_seconds

SIZES = ("large", "xlarge")
SIZE_WEIGHT = MappingProxyType({"large": 1, "xlarge": 2})
# The app's own calls queue with the free tier's: above anonymous visitors, below pro.
TIER_RANK = MappingProxyType({"anonymous": 0, "free": 1, APP_TIER: 1, "pro": 2})
UNLIMITED = math.inf
DAILY_QUOTA = MappingProxyType({"anonymous": 120.0, "free": 210.0, "pro": 1500.0, APP_TIER: UNLIMITED})
DEFAULT_AGING = 30.0


@dataclass(frozen=True)
class Policy:
    """How one node shares its GPUs.

    `daily_quota`: large-seconds per identity per UTC day, by tier (missing
    tiers keep ZEROGPU_QUOTA's value, else ZeroGPU's defaults; math.inf for
    none). `max_duration`: the longest call a tier may ask for, in seconds
    (default: its daily quota). `large_per_gpu`: how many
    `large` calls share one GPU, each capped to that fraction of its memory.
    `aging`: seconds of waiting that lift a call by one tier.
    """

    daily_quota: Mapping[str, float] = field(default_factory=dict)
    max_duration: Mapping[str, float] = field(default_factory=dict)
    large_per_gpu: int = 2
    aging: float = DEFAULT_AGING

    def __post_init__(self) -> None:
        quota = {**DAILY_QUOTA, **settings.daily_quotas(), **self.daily_quota}
        longest = {**quota, **self.max_duration}
        for name, table in (("daily_quota", quota), ("max_duration", longest)):
            for tier, seconds in table.items():
                if tier not in TIERS:
                    raise InvalidArgument(f"{name} names the unknown tier {tier!r}: use {', '.join(TIERS)}")
                check_seconds(seconds, f"{name}[{tier!r}]", positive=True, finite=False)  # math.inf: no limit
        if not isinstance(self.large_per_gpu, int) or isinstance(self.large_per_gpu, bool) or self.large_per_gpu < 1:
            raise InvalidArgument(f"large_per_gpu must be a whole number of at least 1, not {self.large_per_gpu!r}")
        check_seconds(self.aging, "aging", positive=True)
        object.__setattr__(self, "daily_quota", MappingProxyType({t: float(s) for t, s in quota.items()}))
        object.__setattr__(self, "max_duration", MappingProxyType({t: float(s) for t, s in longest.items()}))

    @property
    def memory_fraction(self) -> float:
        """The share of a GPU's memory one `large` call may use."""
        return 1.0 / self.large_per_gpu

    def cost(self, duration: float, size: str) -> float:
        """Quota seconds a call of `duration` seconds of `size` uses."""
        return duration * SIZE_WEIGHT[size]

    def check(self, tier: str, duration: object, size: object) -> None:
        """Refuse a request no quota could ever admit, saying what to ask for instead."""
        if size not in SIZES:
            raise InvalidArgument(f"size {size!r} is unknown: use 'large' (half a GPU) or 'xlarge' (a whole GPU)")
        check_seconds(duration, "duration", positive=True)
        longest = self.max_duration[tier]
        if duration > longest:
            raise InvalidArgument(
                f"duration {duration:g} s is above the {tier_name(tier)}'s maximum of {longest:g} s per call: "
                f"ask for less{raise_it(tier)}"
            )
        cost = self.cost(duration, size)
        daily = self.daily_quota[tier]
        if cost > daily:
            raise InvalidArgument(
                f"an {size} call of {duration:g} s costs {cost:g} s of quota, more than the {tier_name(tier)}'s "
                f"daily {daily:g} s: ask for at most {daily / SIZE_WEIGHT[size]:g} s or use size='large'"
                f"{raise_it(tier)}"
            )

    def level(self, tier: str, waited: float) -> int:
        """The tier rank a call has after waiting `waited` seconds."""
        return TIER_RANK[tier] + int(max(waited, 0.0) // self.aging)

    def priority(self, tier: str, left: float, duration: float, arrival: float, now: float) -> tuple:
        """The sort key of a waiting call at time `now`: smaller goes first."""
        if tier == APP_TIER:
            # The app's own account ranks as a free visitor with a whole day's quota would,
            # not ahead of every one of them for having no limit.
            left = min(left, self.daily_quota["free"])
        return (-self.level(tier, now - arrival), -left, duration, arrival)

    def describe(self) -> dict:
        """The policy as plain data (for status and the daemon's hello)."""
        return {
            "daily_quota": {tier: finite_or_none(s) for tier, s in self.daily_quota.items()},
            "max_duration": {tier: finite_or_none(s) for tier, s in self.max_duration.items()},
            "large_per_gpu": self.large_per_gpu,
            "aging": self.aging,
        }


def tier_name(tier: str) -> str:
    return "app's own account" if tier == APP_TIER else f"{tier} tier"


def raise_it(tier: str) -> str:
    """How the operator changes the app's own limits (visitors' are ZeroGPU's)."""
    return f", or raise it with ZEROGPU_QUOTA={APP_TIER}=SECONDS" if tier == APP_TIER else ""


def finite_or_none(seconds: float) -> float | None:
    """Seconds as plain data: None for no limit (JSON has no infinity)."""
    return seconds if math.isfinite(seconds) else None
