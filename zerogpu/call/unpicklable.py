"""Errors about pickling that say which part of a value could not be pickled, and where it sits.

Pickle's own error names a type but not a place: "arguments['x'] (a
_thread.lock) cannot be pickled" does. Also how an exception and a class are
named in such messages, which the exceptions that travel back use too.
"""

from __future__ import annotations

import types
from typing import Any, Callable, Iterator

from ..errors import SerializationError

MAX_WALK = 100  # how deep an error looks for the part of an object that cannot be pickled


def unpicklable(obj: Any, what: str, exc: Exception, pickles: Callable[[Any], bool]) -> SerializationError:
    """Say which object inside `obj` (named `what`) could not be pickled, and where it sits.

    `exc` is what pickling `obj` raised; `pickles(part)` says whether a part
    pickles on its own.
    """
    # cloudpickle turns a RecursionError into a PicklingError caused by it.
    if isinstance(exc, RecursionError) or isinstance(exc.__cause__, RecursionError):
        return SerializationError(
            f"{what} is nested too deeply to be pickled ({describe_exception(exc)}); flatten it"
        )
    where, culprit = what, obj
    seen = {id(obj)}
    # Walk down while some part fails on its own; the last one is the offender. This runs
    # only after pickling failed, and pickle's own error names a type but not a place.
    for _ in range(MAX_WALK):
        for place, part in _parts(culprit, where):
            if id(part) not in seen and not pickles(part):
                seen.add(id(part))
                where, culprit = place, part
                break
        else:
            break
    return SerializationError(f"{where} ({_a(type(culprit))}) cannot be pickled: {describe_exception(exc)}")


def _parts(obj: Any, where: str) -> Iterator[tuple[str, Any]]:
    if isinstance(obj, (list, tuple)):
        for index, item in enumerate(obj):
            yield f"{where}[{index}]", item
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield f"{where}[{key!r}]", value
            yield f"a key of {where}", key
    elif isinstance(obj, (set, frozenset)):
        for item in obj:
            yield f"an item of {where}", item
    elif isinstance(obj, types.FunctionType):
        for name, cell in zip(obj.__code__.co_freevars, obj.__closure__ or ()):
            try:
                yield f"{where}'s variable {name!r}", cell.cell_contents
            except ValueError:  # an empty cell
                pass
        for name in obj.__code__.co_names:
            if name in obj.__globals__:
                yield f"{where}'s global {name!r}", obj.__globals__[name]
    elif isinstance(obj, types.MethodType):
        yield f"{where}.__self__", obj.__self__
    else:
        attributes = getattr(obj, "__dict__", None)
        if isinstance(attributes, dict):
            for name, value in attributes.items():
                yield f"{where}.{name}", value


def _a(cls: type) -> str:
    """'a torch.Tensor', 'an int'."""
    name = qualified_name(cls)
    return f"an {name}" if name[0].lower() in "aeiou" else f"a {name}"


def describe_exception(exc: BaseException) -> str:
    """'ValueError: its message'."""
    return f"{type(exc).__name__}: {text_of(exc)}"


def text_of(exc: BaseException) -> str:
    """str(exc), or a stand-in when its __str__ raises."""
    try:
        return str(exc)
    except Exception:
        return f"<unprintable {type(exc).__name__} object>"


def qualified_name(cls: type) -> str:
    """'ValueError' for a builtin, 'package.module.Class' for any other."""
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
