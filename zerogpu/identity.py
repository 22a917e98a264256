"""On whose quota a call runs.

The identity is held in a context variable, so it follows threads started
with a copied context and asyncio tasks: a web integration sets it for one
request and every GPU call made while serving that request is charged to it.
With none set, calls run on the app's own account (`app_identity()`): tier
`app`, named after the app, with no daily quota unless ZEROGPU_QUOTA names
`app=SECONDS`.

Visitors of a web app get accounts of their own (see
zerogpu.integrations.visitors); `identify_visitors(fn)` registers the app's
own way of telling them apart.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from . import settings
from .errors import InvalidArgument

VISITOR_TIERS = ("anonymous", "free", "pro")
APP_TIER = "app"
TIERS = (*VISITOR_TIERS, APP_TIER)
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


class Deferred:
    """An identity worked out at the first GPU call that needs it, then kept.

    A web integration sets one when a request comes in, before the layers
    inside it (an authentication middleware, say) have said who is asking.
    """

    __slots__ = ("_resolve", "_lock", "_value")

    def __init__(self, resolve: Callable[[], Identity]) -> None:
        self._resolve = resolve
        self._lock = threading.Lock()
        self._value: Identity | None = None

    def get(self) -> Identity:
        with self._lock:
            if self._value is None:
                self._value = self._resolve()
            return self._value


_current: ContextVar[Identity | Deferred | None] = ContextVar("zerogpu_identity", default=None)


@contextmanager
def identity(user: str, tier: str = "free") -> Iterator[Identity]:
    """Run the GPU calls made inside the block as `user` of `tier`."""
    chosen = Identity(user, tier)
    with acting_as(chosen):
        yield chosen


@contextmanager
def acting_as(chosen: Identity | Deferred) -> Iterator[None]:
    """Run the GPU calls made inside the block as `chosen` (an Identity, or one to work out later)."""
    token = _current.set(chosen)
    try:
        yield
    finally:
        _current.reset(token)


def current() -> Identity:
    """The identity GPU calls made here run as: the one set, else the app's own account."""
    chosen = _current.get()
    if chosen is None:
        return app_identity()
    if isinstance(chosen, Deferred):
        return chosen.get()
    return chosen


# -- the app's own account ------------------------------------------------------------------


def app_identity() -> Identity:
    """The app's own account: tier `app`, named by ZEROGPU_APP (which `zerogpu run` sets) or the main script."""
    return Identity(clip(settings.app_name() or main_script()), APP_TIER)


def main_script() -> str:
    """The absolute path of the __main__ module's file; 'python' for an interactive session."""
    path = getattr(sys.modules.get("__main__"), "__file__", None)
    return os.path.abspath(path) if path else "python"


def clip(name: str) -> str:
    """A name that fits an account: a path too long keeps its end, which tells apps apart."""
    return name if len(name) <= MAX_USER_LENGTH else "..." + name[-(MAX_USER_LENGTH - 3):]


# -- the app's own way of naming its visitors ---------------------------------------------

Resolver = Callable[[object], "tuple[str, str] | None"]
_resolver: Resolver | None = None


def identify_visitors(fn: Resolver | None) -> Resolver | None:
    """Register how this app tells its web visitors apart; None unregisters.

    `fn(request)` gets the web framework's request (a gradio.Request, a
    starlette Request) and returns `(user, tier)`, with tier one of
    anonymous, free or pro, or None to fall back to zerogpu's own rules
    (a logged-in user, else one anonymous account per client address).
    Returns `fn`, so that it can be used as a decorator.
    """
    global _resolver
    if fn is not None and not callable(fn):
        raise InvalidArgument(f"identify_visitors takes a function of the request, not {type(fn).__name__}")
    _resolver = fn
    return fn


def visitor_resolver() -> Resolver | None:
    """The function registered with identify_visitors, if any."""
    return _resolver
