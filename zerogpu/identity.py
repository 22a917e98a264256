"""On whose quota a call runs.

The identity is held in a context variable, so it follows threads started
with a copied context and asyncio tasks: a web integration sets it for one
request and every GPU call made while serving that request is charged to it.
With none set, calls run as `ANONYMOUS`, one identity shared by the whole app.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from .errors import InvalidArgument

TIERS = ("anonymous", "free", "pro")
MAX_USER_LENGTH = 256


@dataclass(frozen=True)
class Identity:
    """A user and the tier that sets their daily GPU quota and their place in the queue."""

    user: str
    tier: str

    def __post_init__(self) -> None:
        if not isinstance(self.user, str) or not self.user.strip():
            raise InvalidArgument(f"user must be a non-empty string, not {self.user!r}")
        if len(self.user) > MAX_USER_LENGTH:
            raise InvalidArgument(
                f"user is {len(self.user)} characters long; at most {MAX_USER_LENGTH} are allowed"
            )
        if self.tier not in TIERS:
            raise InvalidArgument(f"tier {self.tier!r} is unknown: use one of {', '.join(TIERS)}")


ANONYMOUS = Identity("anonymous", "anonymous")

_current: ContextVar[Identity] = ContextVar("zerogpu_identity", default=ANONYMOUS)


@contextmanager
def identity(user: str, tier: str = "free") -> Iterator[Identity]:
    """Run the GPU calls made inside the block as `user` of `tier`."""
    chosen = Identity(user, tier)
    token = _current.set(chosen)
    try:
        yield chosen
    finally:
        _current.reset(token)


def current() -> Identity:
    """The identity GPU calls made here run as."""
    return _current.get()
