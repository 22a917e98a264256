"""zerogpu: share GPUs between Python apps; a decorated function holds a GPU only while it runs."""

from .call.decorator import GPU
from .errors import *  # noqa: F401,F403
from .errors import __all__ as _errors
from .identity import identify_visitors, identity
from .runtime import enable, is_enabled, startup

__all__ = ["GPU", "enable", "is_enabled", "startup", "identity", "identify_visitors", *_errors]

from . import hints as _hints  # noqa: E402
from . import settings as _settings  # noqa: E402

_hints.install()
try:
    if _settings.enabled():
        enable()
except ZeroGPUError as _error:  # noqa: F405 - from .errors
    # A bad ZEROGPU_* setting: raised as usual, reported in one line if nobody catches it.
    _hints.failed_import(_error)
    raise
