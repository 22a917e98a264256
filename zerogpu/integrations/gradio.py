"""Gradio apps on zerogpu, as on a ZeroGPU Space, with no change to the app.

When a decorated function is called inside a Gradio event:

- the call is charged to the visitor (zerogpu.integrations.visitors);
- `gr.Progress` (with `track_tqdm=True` too), `gr.Info`, `gr.Warning` and
  `gr.Success` called in the worker reach the visitor while the call runs,
  in order: in the worker, Gradio's event queue is a stand-in that sends
  them to the parent, which hands them to the real queue of the event;
- the visitor is told when the call waits for a GPU, when it got one, and
  when it runs past its duration (before it is killed);
- errors become `gr.Error`, which Gradio shows even with `show_error=False`:
  "GPU task aborted" for a worker that died or ran out of time, the quota's
  own words, "No GPU was available after N s"; a `gr.Error` the function
  raised as it is; any other error by its class name only, its message and
  traceback going to the server's log.

And `launch()` packs the weights moved to 'cuda' so far, so that the first
visitor does not wait for it. `install()` sets all of this up; gradio is
patched when it is imported (at once if it already is).
"""

from __future__ import annotations

import contextlib
import copyreg
import functools
import importlib.abc
import importlib.machinery
import logging
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from .. import runtime, settings
from ..call import events
from ..errors import (
    AttachError,
    CallTimeout,
    NoGPUAvailable,
    QuotaExceeded,
    RestoreError,
    WorkerCrashed,
)
from ..identity import Identity

log = logging.getLogger("zerogpu.gradio")

TITLE = "ZeroGPU"
ABORTED = (WorkerCrashed, CallTimeout, AttachError, RestoreError)
# The real ZeroGPU's words for what happens to a call.
NOTICES = {
    "queued": ("info", "Waiting for a GPU to become available"),
    "granted": ("success", "Successfully acquired a GPU"),
    "overtime": ("warning", "GPU task is exceeding its requested duration and might be aborted"),
}
# A function updating its progress bar in a tight loop sends at most this many updates a second.
PROGRESS_PER_SECOND = 20


def install() -> None:
    """Watch calls made in Gradio events, and pack the weights at launch(); safe to call more than once."""
    events.register("gradio", Relay())
    if "gradio" in sys.modules:
        patch_gradio()
    elif not any(isinstance(finder, _PatchOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Patches gradio once it is imported: the app may import it after zerogpu."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name != "gradio":
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                spec.loader = _PatchAfterLoad(spec.loader)
                return spec
        return None


class _PatchAfterLoad(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self.loader.exec_module(module)
        patch_gradio()

    def __getattr__(self, name: str) -> Any:  # is_package, get_resource_reader...
        return getattr(self.loader, name)


def patch_gradio() -> None:
    import gradio as gr
    from gradio.helpers import TrackedIterable

    # A progress bar's iterables hold the iterator and tqdm bar they track, which need not
    # pickle; the worker only needs where the bar stands.
    copyreg.pickle(TrackedIterable, _reduce_tracked)
    launch = gr.Blocks.launch
    if getattr(launch, "zerogpu", False):
        return

    @functools.wraps(launch)
    def packing_launch(self, *args, **kwargs):
        if runtime.is_enabled():
            runtime.startup()  # before the first visitor, who would otherwise wait for it
        return launch(self, *args, **kwargs)

    packing_launch.zerogpu = True  # type: ignore[attr-defined]
    gr.Blocks.launch = packing_launch


def _reduce_tracked(tracked: Any) -> tuple:
    from gradio.helpers import TrackedIterable

    return TrackedIterable, (None, tracked.index, tracked.length, tracked.desc, tracked.unit, None,
                             tracked.progress)


# -- the parent ------------------------------------------------------------------------------


@dataclass
class State:
    """What the worker needs of the event: which it is, and the progress bar gr.Progress(track_tqdm=True) set."""

    event_id: str
    in_event_listener: bool
    progress: Any


class Watch:
    """One call inside one Gradio event: shows the worker's events and the call's notices to its visitor."""

    def __init__(self, queue: Any, event_id: str, identity: Identity | None, state: State) -> None:
        self.queue = queue
        self.event_id = event_id
        self.identity = identity
        self.state = state

    def replay(self, payload: Any) -> None:
        from gradio.helpers import TrackedIterable

        kind, value = payload
        if kind == "progress":
            self.queue.set_progress(self.event_id, [TrackedIterable(None, *unit) for unit in value])
        elif kind == "log":
            self.queue.log_message(event_id=self.event_id, **value)

    def notice(self, kind: str) -> None:
        level, text = NOTICES[kind]
        self.queue.log_message(event_id=self.event_id, log=text, title=TITLE, level=level)


def event() -> tuple[Any, str] | None:
    """The Blocks and the id of the Gradio event being served here; None outside one."""
    if "gradio.context" not in sys.modules:
        return None  # gradio was never imported: no event either
    from gradio.context import LocalContext

    blocks = LocalContext.blocks.get(None)
    event_id = LocalContext.event_id.get(None)
    if blocks is None or event_id is None or getattr(blocks, "_queue", None) is None:
        return None
    return blocks, event_id


def visitor(request: Any) -> Identity | None:
    """Whom a call made for `request` is charged to."""
    if request is None:
        return None
    from .visitors import visitor_identity

    client = getattr(request, "client", None)
    return visitor_identity(
        request,
        peer=getattr(client, "host", None),
        headers=dict(getattr(request, "headers", None) or {}),
        username=getattr(request, "username", None),
    )


class Relay:
    """zerogpu.call.events' relay for Gradio."""

    def watch(self) -> Watch | None:
        found = event()
        if found is None:
            return None
        from gradio.context import LocalContext

        blocks, event_id = found
        state = State(event_id, LocalContext.in_event_listener.get(False), LocalContext.progress.get(None))
        return Watch(blocks._queue, event_id, visitor(LocalContext.request.get(None)), state)

    @contextlib.contextmanager
    def enter(self, state: State, emit: Callable[[Any], None]) -> Iterator[None]:
        from gradio.context import LocalContext

        queue = WorkerQueue(emit)
        settings_ = [
            (LocalContext.blocks, _WorkerBlocks(queue)),
            (LocalContext.event_id, state.event_id),
            (LocalContext.in_event_listener, state.in_event_listener),
            (LocalContext.progress, state.progress),
        ]
        tokens = [(var, var.set(value)) for var, value in settings_]
        try:
            yield
        finally:
            queue.flush()
            for var, token in reversed(tokens):
                var.reset(token)

    def translate(self, error: Exception) -> BaseException | None:
        import gradio as gr

        if isinstance(error, gr.Error) or event() is None:
            return None
        if isinstance(error, ABORTED):
            log.error("GPU task aborted: %s", error)
            return visible_error("GPU task aborted")
        if isinstance(error, QuotaExceeded):
            return visible_error(str(error))
        if isinstance(error, NoGPUAvailable):
            log.error("%s", error)
            return visible_error(f"No GPU was available after {settings.queue_timeout():g} s")
        name = getattr(error, "type_name", None) or type(error).__qualname__
        log.error("the GPU function raised %s", name, exc_info=error)
        return visible_error(name.rpartition(".")[2])


def visible_error(message: str) -> Exception:
    import gradio as gr

    # Already logged, without the visitor's share of the traceback.
    return gr.Error(message, title=TITLE, print_exception=False)


# -- the worker ------------------------------------------------------------------------------


class _WorkerBlocks:
    """Stands in for the event's Blocks in the worker: what gr.Progress and gr.Info look for is its queue."""

    def __init__(self, queue: "WorkerQueue") -> None:
        self._queue = queue


class WorkerQueue:
    """Gradio's event queue in the worker: progress and messages go to the parent, in order.

    Progress updates closer together than 1/PROGRESS_PER_SECOND s are merged
    into the latest (Gradio shows only the latest anyway); a message, and the
    end of the call, send the one pending first.
    """

    def __init__(self, emit: Callable[[Any], None]) -> None:
        self.emit = emit
        self.pending: list | None = None
        self.sent = 0.0

    def set_progress(self, event_id: str, iterables: list | None) -> None:
        if iterables is None:
            return
        self.pending = [(t.index, t.length, t.desc, t.unit, None, t.progress) for t in iterables]
        now = time.monotonic()
        if now - self.sent >= 1 / PROGRESS_PER_SECOND:
            self.sent = now
            self.flush()

    def log_message(self, event_id: str, log: str, title: str, level: str, duration: float | None = 10,
                    visible: bool = True) -> None:
        self.flush()
        self.emit(("log", {"log": log, "title": title, "level": level, "duration": duration, "visible": visible}))

    def flush(self) -> None:
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self.emit(("progress", pending))
