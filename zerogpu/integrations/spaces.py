"""`import spaces` for apps written for Hugging Face's ZeroGPU, on zerogpu.

`zerogpu run app.py` installs this module as `spaces` (see `install`), so an
app written for ZeroGPU runs unchanged on the machine's own GPUs. It can be
imported without zerogpu enabled too, and then does nothing, as the real
package does off ZeroGPU: `spaces.GPU` returns functions unchanged.

What it offers:

- `GPU`, in every form the real one takes: bare, `duration=` (seconds, a
  `timedelta` or a callable taking the function's arguments), `size=`
  ("large" or "xlarge"), and the positional shorthands `GPU(45)` and
  `GPU("xlarge")`. `enable_queue=` is accepted and ignored with a warning, as
  there. Unlike the real one it also takes `async def` functions.
- `config.Config.zero_gpu` (True under `zerogpu run`) and `zero.startup()`,
  which apps use to pack their weights before serving.
- `gradio_auto_wrap`, `enable_gradio_auto_wrap`, `disable_gradio_auto_wrap`.
- The ahead-of-time compilation helpers (`aoti_*`) raise NotImplementedError
  saying what to do instead.
"""

from __future__ import annotations

import sys
import types
import warnings
from collections.abc import Callable
from typing import Any, NoReturn

from .. import runtime
from . import gradio
from ..call.decorator import decorator

__all__ = [
    "GPU",
    "aoti_apply",
    "aoti_blocks_load",
    "aoti_capture",
    "aoti_compile",
    "aoti_compile_and_save",
    "aoti_load",
    "aoti_load_call_source",
    "aoti_load_from_package_dir",
    "aoti_patch",
    "config",
    "disable_gradio_auto_wrap",
    "enable_gradio_auto_wrap",
    "gradio_auto_wrap",
    "zero",
]


def GPU(task: Any = None, *, duration: Any = None, size: str | None = None, **kwargs: Any) -> Any:
    """`spaces.GPU`: run the function in a worker that holds a GPU only while it runs.

    Takes what the real decorator takes; see zerogpu.GPU for the forms.
    """
    if "enable_queue" in kwargs:
        del kwargs["enable_queue"]
        # The real package's own words: the argument is a leftover of older Gradio versions.
        warnings.warn("`enable_queue` parameter is now ignored and always set to `True`", stacklevel=2)
    if kwargs:
        raise TypeError(
            f"spaces.GPU() got unexpected keyword arguments {', '.join(map(repr, kwargs))}: "
            "it takes duration= and size="
        )
    return decorator(task, duration, size, "@spaces.GPU")


# -- Gradio --------------------------------------------------------------------------------
# Gradio, when it runs on a Space, passes every event function through
# `spaces.gradio_auto_wrap`. Raising there would break every such app, so these
# work as in the real package: wrapping is off unless switched on, and then each
# event function becomes a GPU function.

_auto_wrap = False


def gradio_auto_wrap(task: Any) -> Any:
    """`task` decorated with GPU when auto-wrapping is on; otherwise `task` itself."""
    if not _auto_wrap or not callable(task):
        return task
    return GPU(task)


def enable_gradio_auto_wrap() -> None:
    global _auto_wrap
    _auto_wrap = True


def disable_gradio_auto_wrap() -> None:
    global _auto_wrap
    _auto_wrap = False


# -- what zerogpu does not do --------------------------------------------------------------


def unsupported(name: str) -> Callable[..., NoReturn]:
    """A stand-in for a `spaces` function zerogpu does not offer; calling it says why and what to do."""

    def refuse(*args: Any, **kwargs: Any) -> NoReturn:
        raise NotImplementedError(
            f"spaces.{name} (ZeroGPU's ahead-of-time compilation with AOTInductor) is not supported by "
            "zerogpu: run the model uncompiled, or compile it with torch.compile inside the @spaces.GPU "
            "function"
        )

    refuse.__name__ = refuse.__qualname__ = name
    return refuse


aoti_capture = unsupported("aoti_capture")
aoti_compile = unsupported("aoti_compile")
aoti_compile_and_save = unsupported("aoti_compile_and_save")
aoti_apply = unsupported("aoti_apply")
aoti_patch = unsupported("aoti_patch")
aoti_load = unsupported("aoti_load")
aoti_load_call_source = unsupported("aoti_load_call_source")
aoti_load_from_package_dir = unsupported("aoti_load_from_package_dir")
aoti_blocks_load = unsupported("aoti_blocks_load")


# -- spaces.config and spaces.zero ---------------------------------------------------------


class Settings:
    """`spaces.config.Config`: the settings apps read, answered by zerogpu.

    Apps mostly ask `Config.zero_gpu` to learn whether their GPU functions
    run on ZeroGPU (here: whether zerogpu is enabled). The real package's
    other settings configure Hugging Face's service and have no meaning here.
    """

    @property
    def zero_gpu(self) -> bool:
        return runtime.is_enabled()

    @property
    def gradio_auto_wrap(self) -> bool:
        return _auto_wrap

    def __getattr__(self, name: str) -> NoReturn:
        raise AttributeError(
            f"spaces.config.Config.{name} is a setting of Hugging Face's ZeroGPU service, which zerogpu does "
            "not have: zerogpu offers Config.zero_gpu and Config.gradio_auto_wrap, and reads its own settings "
            "from ZEROGPU_* environment variables"
        )


def startup() -> None:
    """`spaces.zero.startup()`: pack the weights moved to 'cuda' now, not on the first call."""
    if runtime.is_enabled():
        runtime.startup()


config = types.ModuleType("spaces.config", "The settings of `spaces`, as zerogpu answers them.")
config.Config = Settings()  # type: ignore[attr-defined]
zero = types.ModuleType("spaces.zero", "The start-up hook of `spaces`, on zerogpu.")
zero.startup = startup  # type: ignore[attr-defined]


def __getattr__(name: str) -> NoReturn:
    raise AttributeError(
        f"module 'spaces' (zerogpu's ZeroGPU compatibility module) has no attribute {name!r}: "
        f"it offers {', '.join(__all__)}"
    )


def install() -> None:
    """Make `import spaces`, `spaces.config` and `spaces.zero` give this module's objects.

    Gradio gets what a Space gives it too (see zerogpu.integrations.gradio).
    """
    gradio.install()
    sys.modules["spaces"] = sys.modules[__name__]
    sys.modules["spaces.config"] = config
    sys.modules["spaces.zero"] = zero
