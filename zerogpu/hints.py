"""What an app that imported zerogpu sees when it dies of a mistake zerogpu can explain.

Two mistakes are common in the first minutes: touching CUDA before zerogpu is
enabled, which ends in torch's bare "Torch not compiled with CUDA enabled"
(or "Found no NVIDIA driver" on a CUDA build), and a bad ZEROGPU_* setting
read when `import zerogpu` enables it.

Nothing here changes what is raised or who may catch it: torch is not
patched, exceptions are not replaced. Only the report of an exception nobody
caught changes, through sys.excepthook and threading.excepthook: the CUDA
error gets a note saying what to do, and the bad setting is said in one line
instead of a traceback through zerogpu's import.
"""

from __future__ import annotations

import sys
import threading
from types import TracebackType

from .errors import ZeroGPUError

# What torch says when CUDA is used with no CUDA to use: a CPU build, or a CUDA build without a driver.
NO_CUDA = ("Torch not compiled with CUDA enabled", "Found no NVIDIA driver on your system")
CUDA_HINT = (
    "zerogpu is imported but not enabled, so 'cuda' is torch's own, which has no CUDA here: "
    "call zerogpu.enable() first (before moving models to 'cuda' and decorating functions), "
    "set ZEROGPU=1 in the environment, or run the app as `zerogpu run app.py`"
)

_installed = False
_import_error: BaseException | None = None


def install() -> None:
    """Put the reporting hooks in place, once per process, in front of whatever hooks were there."""
    global _installed
    if _installed:
        return
    _installed = True
    previous = sys.excepthook
    previous_thread = threading.excepthook

    def excepthook(kind: type[BaseException], error: BaseException, trace: TracebackType | None) -> None:
        if error is _import_error:
            # The traceback would only show zerogpu's import: the message says it all.
            sys.stderr.write(f"zerogpu: {error}\n")
            return
        explain(error)
        previous(kind, error, trace)

    def thread_excepthook(args: threading.ExceptHookArgs) -> None:
        if args.exc_value is not None:
            explain(args.exc_value)
        previous_thread(args)

    sys.excepthook = excepthook
    threading.excepthook = thread_excepthook


def failed_import(error: ZeroGPUError) -> None:
    """`import zerogpu` is about to raise `error` (a bad setting): if nobody catches it, say it in one line."""
    global _import_error
    _import_error = error


def explain(error: BaseException) -> None:
    """Add the CUDA hint to `error`, or to the exception it was raised from, if one of them calls for it."""
    runtime = sys.modules.get("zerogpu.runtime")  # not imported: zerogpu was never enabled
    if runtime is not None and runtime.is_enabled():
        return  # 'cuda' is emulated: this error does not come from zerogpu being off
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if needs_hint(current):
            add_note(current, CUDA_HINT)
            return
        current = current.__cause__ or current.__context__


def needs_hint(error: BaseException) -> bool:
    return isinstance(error, (AssertionError, RuntimeError)) and any(text in str(error) for text in NO_CUDA)


def add_note(error: BaseException, note: str) -> None:
    notes = getattr(error, "__notes__", None) or []
    if note in notes:
        return
    if hasattr(error, "add_note"):
        error.add_note(note)
    else:  # Python 3.10 prints no notes: the hint goes in the message instead
        error.args = (f"{error.args[0] if error.args else ''}\n{note}", *error.args[1:])
        error.__notes__ = [*notes, note]
