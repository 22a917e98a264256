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
- The ahead-of-time compilation helpers (`aoti_capture`, `aoti_compile`,
  `aoti_apply`, `aoti_compile_and_save`, `aoti_load_from_package_dir`,
  `aoti_load`, `aoti_blocks_load`, `aoti_patch`, `aoti_load_call_source`), on
  zerogpu.call.aot: a compiled package crosses back without its weights and
  binds the module's own in each worker. `aoti_load` and `aoti_blocks_load`
  take a local folder as well as a Hub repository (which needs
  huggingface_hub and the network).
"""

from __future__ import annotations

import inspect
import os
import sys
import textwrap
import types
import warnings
from pathlib import Path
from typing import Any, NoReturn

from .. import runtime
from . import gradio
from ..call import aot
from ..call.decorator import decorator
from ..errors import InvalidArgument

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
    unknown = sorted(set(kwargs) - _warned)
    if unknown:
        # The real decorator takes **kwargs and ignores what it does not know.
        _warned.update(unknown)
        warnings.warn(
            f"spaces.GPU() ignores {', '.join(map(repr, unknown))}: zerogpu takes duration= and size=",
            stacklevel=2,
        )
    return decorator(task, duration, size, "@spaces.GPU")


_warned: set[str] = set()


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


# -- ahead-of-time compilation -------------------------------------------------------------
# The folder layout is the real package's: <package_dir>/root/package.pt2 for the
# module itself, <package_dir>/submodules/<name>/package.pt2 for its submodules.

PACKAGE_DIRNAME = "package"

aoti_capture = aot.capture


def aoti_compile(exported_program: Any, inductor_configs: dict[str, Any] | None = None) -> aot.Compiled:
    """Compile an ExportedProgram, in the @spaces.GPU function, into a package without its weights."""
    return aot.compile_exported(exported_program, inductor_configs)


def aoti_apply(compiled: aot.Compiled, module: Any, call_method: str = "forward") -> None:
    """Run `module.<call_method>` through the compiled package; the module keeps its weights."""
    aot.apply(compiled, module, call_method)


def aoti_patch(module: Any, aoti_model: aot.Compiled, call_method: str = "forward") -> None:
    aot.apply(aoti_model, module, call_method)


def aoti_compile_and_save(
    package_dir: str | os.PathLike[str],
    exported_program: Any,
    inductor_configs: dict[str, Any] | None = None,
    submodule: str | None = None,
) -> None:
    folder = Path(package_dir) / ("root" if submodule is None else Path("submodules", submodule))
    aot.save(aot.compile_exported(exported_program, inductor_configs), folder)


def aoti_load_from_package_dir(module: Any, package_dir: str | os.PathLike[str]) -> None:
    package_dir = Path(package_dir)
    if not (package_dir / "root").is_dir() and not (package_dir / "submodules").is_dir():
        raise InvalidArgument(
            f"spaces.aoti_load_from_package_dir: {package_dir} has neither root/ nor submodules/: "
            "save packages there with spaces.aoti_compile_and_save"
        )
    submodules = package_dir / "submodules"
    if submodules.is_dir():
        for folder in sorted(submodules.iterdir()):
            if folder.is_dir():
                _apply_to_blocks(aot.read(folder), module.get_submodule(folder.name))
    if (package_dir / "root").is_dir():
        _apply_to_blocks(aot.read(package_dir / "root"), module)


def _apply_to_blocks(compiled: aot.Compiled, module: Any) -> None:
    # A ModuleList gets the package on each of its blocks, as in the real package.
    blocks = list(module) if hasattr(module, "__iter__") else [module]
    for block in blocks:
        aot.apply(compiled, block)


def _local_or_hub(repo_id: str, what: str) -> Path | None:
    if Path(repo_id).is_dir():
        return Path(repo_id)
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        raise InvalidArgument(
            f"spaces.{what}: {repo_id!r} is not a folder here, and downloading it from the Hub needs "
            "huggingface_hub (pip install huggingface_hub); or pass the folder the packages were saved to"
        ) from None
    return None


def aoti_load(module: Any, repo_id: str, revision: str | None = None, aoti_loader: Any = None) -> None:
    """Load the packages of `repo_id` (a local folder, or a Hub repository) onto `module`."""
    root = _local_or_hub(repo_id, "aoti_load")
    if root is None:
        from huggingface_hub import snapshot_download

        root = Path(snapshot_download(repo_id=repo_id, revision=revision, allow_patterns=f"{PACKAGE_DIRNAME}/*"))
    package_dir = root / PACKAGE_DIRNAME
    if aoti_loader is not None:
        aoti_loader(module, str(package_dir))
    else:
        aoti_load_from_package_dir(module, package_dir)


def aoti_blocks_load(module: Any, repo_id: str, variant: str | None = None) -> None:
    """Load one package per repeated block class (`module._repeated_blocks`) onto every such block."""
    names = getattr(module, "_repeated_blocks", None)
    if names is None:
        raise InvalidArgument(
            f"spaces.aoti_blocks_load: {type(module).__name__} has no _repeated_blocks naming its block classes"
        )
    folders = {name: f"{name}.{variant}" if variant else name for name in names}
    root = _local_or_hub(repo_id, "aoti_blocks_load")
    if root is None:
        from huggingface_hub import hf_hub_download

        packages = {
            name: aot.read(hf_hub_download(repo_id=repo_id, filename=aot.PACKAGE_FILENAME, subfolder=folder))
            for name, folder in folders.items()
        }
    else:
        packages = {name: aot.read(root / folder) for name, folder in folders.items()}
    for block in module.modules():
        compiled = packages.get(type(block).__name__)
        if compiled is not None:
            aot.apply(compiled, block)


def aoti_load_call_source(
    module_expr: str, repo_id: str, revision: str | None = None, aoti_loader: Any = None
) -> str:
    """The source of the `spaces.aoti_load(...)` call that loads these packages (with the loader's source)."""
    source = ""
    if aoti_loader is not None:
        source = textwrap.dedent(inspect.getsource(aoti_loader)).strip() + "\n\n"
    arguments = [f"module={module_expr}", f"repo_id={repo_id!r}"]
    if revision is not None:
        arguments.append(f"revision={revision!r}")
    if aoti_loader is not None:
        arguments.append(f"aoti_loader={aoti_loader.__name__}")
    return source + "spaces.aoti_load(\n" + "".join(f"    {argument},\n" for argument in arguments) + ")\n"


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
