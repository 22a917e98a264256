"""zerogpu: share GPUs between Python apps; a decorated function holds a GPU only while it runs."""

from .errors import *  # noqa: F401,F403
from .errors import __all__ as _errors
from .identity import identify_visitors, identity

__all__ = ["GPU", "enable", "is_enabled", "startup", "identity", "identify_visitors", *_errors]

# Imported at first use: they bring torch, and `zerogpu --help` or `zerogpu status` must not wait for it.
_LAZY = {"GPU": ".call.decorator", "enable": ".runtime", "is_enabled": ".runtime",
         "startup": ".runtime"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'zerogpu' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


from . import hints as _hints  # noqa: E402
from . import settings as _settings  # noqa: E402

_hints.install()
try:
    if _settings.enabled():
        __getattr__("enable")()
except ZeroGPUError as _error:  # noqa: F405 - from .errors
    # A bad ZEROGPU_* setting: raised as usual, reported in one line if nobody catches it.
    _hints.failed_import(_error)
    raise
