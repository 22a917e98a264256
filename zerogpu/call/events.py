"""What a web framework's integration adds to a call, without the call layer knowing the framework.

An integration registers a `Relay` under a name. For each call, in the
parent, `watch()` asks the relays whether the call is made inside one of
their events (a Gradio event, say); the one that answers gives a `Watch`,
which the call keeps until it ends:

- `Watch.identity`, when set, is whom the call is charged to (the visitor);
- `Watch.state` travels to the worker with the arguments (pickled with them,
  so an object found in both is one object there), and the relay's
  `enter(state, emit)` runs the function inside it: what the function
  reports there (progress, a message to the visitor) goes to `emit` and comes
  back to the parent as an ("event", payload) message while the call runs;
- `Watch.replay(payload)` shows such an event, in the parent, in order;
- `Watch.notice(kind)` says what happens to the call: "queued" (it waits for a
  GPU), "granted" (it got one after waiting), "overtime" (it ran past its
  duration and is about to be killed);
- `translate(error)` turns an error the call raised into the one the
  framework shows its user, or returns None to let it through as it is.

Relays are registered in the parent before workers fork, so a worker finds
the same relay by name.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, Iterator, Protocol

from ..identity import Identity


class Watch(Protocol):
    identity: Identity | None
    state: Any

    def replay(self, payload: Any) -> None: ...

    def notice(self, kind: str) -> None: ...


class Relay(Protocol):
    def watch(self) -> Watch | None: ...

    def enter(self, state: Any, emit: Callable[[Any], None]) -> ContextManager[None]: ...

    def translate(self, error: Exception) -> BaseException | None: ...


_relays: dict[str, Relay] = {}


def register(name: str, relay: Relay) -> None:
    """Let `relay` watch every call from now on; registering a name again replaces its relay."""
    _relays[name] = relay


def watch() -> tuple[str, Watch] | None:
    """The relay that claims the call being made here, by name, and its watch; None when none does."""
    for name, relay in list(_relays.items()):
        found = relay.watch()
        if found is not None:
            return name, found
    return None


def entered(name: str | None, state: Any, emit: Callable[[Any], None]) -> ContextManager[None]:
    """In the worker: the context the function of a watched call runs in."""
    relay = _relays.get(name) if name is not None else None
    if relay is None:
        return contextlib.nullcontext()
    return relay.enter(state, emit)


@contextlib.contextmanager
def translated() -> Iterator[None]:
    """Raise, in place of an error of the block, the error a relay shows its user instead."""
    try:
        yield
    except Exception as error:
        for relay in list(_relays.values()):
            replacement = relay.translate(error)
            if replacement is not None and replacement is not error:
                raise replacement from None
        raise
