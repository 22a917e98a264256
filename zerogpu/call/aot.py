"""Ahead-of-time compilation: compile a module once in a worker, run the package in every later one.

The compile runs in a worker (AOTInductor: CUDA kernels on a GPU, C++ ones on
the emulated backend). What comes back is the compiled package alone: it is
built with its weights left out (`package_constants_in_so=False`), so the
parent holds no second copy of them. Each worker that runs the module loads
the package once and binds it to the module's own weights, those the worker
restored from the snapshot (`load_constants(..., user_managed=True)` uses
that memory as it is). Packages are saved to a folder and loaded from it at
the next start, so a restarted app does not compile again.

    compiled = zerogpu.aot.compile(model.transformer, example_args)
    zerogpu.aot.apply(compiled, model.transformer)
    zerogpu.aot.save(compiled, "compiled/transformer")   # later: zerogpu.aot.load(model.transformer, ...)
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Any, Iterator

from ..errors import InvalidArgument
from .decorator import GPU

PACKAGE_FILENAME = "package.pt2"

# Inductor settings that leave the weights out of the package and keep every
# weight a named constant that load_constants can bind.
PACKAGE_WITHOUT_WEIGHTS: dict[str, Any] = {
    "aot_inductor.package": True,
    "aot_inductor.package_constants_in_so": False,
    "aot_inductor.package_constants_on_disk_format": "pickle_weights",
    "always_keep_tensor_constants": True,
    "joint_graph_constant_folding": False,
}


class Compiled:
    """A compiled package without its weights: bytes that cross processes and go to disk as they are."""

    def __init__(self, archive: bytes) -> None:
        if not isinstance(archive, (bytes, bytearray)) or not archive:
            raise InvalidArgument("a compiled package is the non-empty bytes of a .pt2 archive")
        self.archive = bytes(archive)
        self._loaded: tuple[int, Any] | None = None  # (process id, the loaded package)

    def loaded(self) -> Any:
        """The package loaded in this process: once per worker, never inherited from another process."""
        if self._loaded is None or self._loaded[0] != os.getpid():
            import torch._inductor

            self._loaded = (os.getpid(), torch._inductor.aoti_load_package(io.BytesIO(self.archive)))
        return self._loaded[1]

    def __reduce__(self) -> Any:
        return Compiled, (self.archive,)

    def __repr__(self) -> str:
        return f"<zerogpu.aot.Compiled: {len(self.archive)} bytes, weights bound at load>"


class Bound:
    """A module's call method replaced by its compiled package, bound to the module's current weights."""

    def __init__(self, compiled: Compiled, module: Any) -> None:
        self.compiled = compiled
        self.module = module
        self._bound: tuple[int, tuple] | None = None  # (process id, data pointers of the weights bound)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        import torch

        from ..cuda import emulation

        package = self.compiled.loaded()
        # Parameters and every buffer: exported constants include non-persistent buffers.
        weights = {
            **dict(self.module.named_buffers(remove_duplicate=False)),
            **dict(self.module.named_parameters(remove_duplicate=False)),
        }
        names = package.get_constant_fqns()
        missing = [name for name in names if name not in weights]
        if missing:
            raise InvalidArgument(
                f"the compiled package needs weights the module does not have ({', '.join(missing[:5])}): "
                "apply it to the module it was compiled from"
            )
        pointers = tuple(weights[name].data_ptr() for name in names)
        if self._bound != (os.getpid(), pointers):
            # Restored weights live at new addresses in each worker: bind them there.
            with emulation.suspended():
                constants = {name: weights[name].detach() for name in names}
                package.load_constants(constants, check_full_update=True, user_managed=True)
            self._bound = (os.getpid(), pointers)
        index = _emulated_index(args, kwargs, weights.values()) if emulation.is_patched() else None
        with torch.no_grad(), emulation.suspended():
            result = package(*args, **kwargs)
        if index is not None:
            for leaf in torch.utils._pytree.tree_leaves(result):
                if isinstance(leaf, torch.Tensor):
                    emulation.mark(leaf, index)
        return result


def _emulated_index(args: tuple, kwargs: dict, weights: Any) -> int | None:
    import torch

    from ..cuda import emulation

    for tensor in (*torch.utils._pytree.tree_leaves((args, kwargs)), *weights):
        if isinstance(tensor, torch.Tensor) and emulation.is_cuda(tensor):
            return tensor.get_device()
    return None


class Captured:
    """The arguments of the call `capture` caught."""

    def __init__(self) -> None:
        self.args: tuple = ()
        self.kwargs: dict[str, Any] = {}
        self.caught = False


class _CaughtCall(Exception):
    def __init__(self, args: tuple, kwargs: dict) -> None:
        super().__init__("the captured call stops here")
        self.call_args, self.call_kwargs = args, kwargs


@contextlib.contextmanager
def capture(module: Any, call_method: str = "forward") -> Iterator[Captured]:
    """Catch the first call of `module.<call_method>` in the block, and end the block there.

    The caught arguments are the example inputs to export the module with.
    """
    if not hasattr(module, call_method):
        raise InvalidArgument(f"capture(): {type(module).__name__} has no method {call_method!r} to capture")
    captured = Captured()

    def catch(*args: Any, **kwargs: Any) -> Any:
        raise _CaughtCall(args, kwargs)

    had_own = call_method in vars(module)
    original = vars(module).get(call_method)
    setattr(module, call_method, catch)
    try:
        yield captured
    except _CaughtCall as call:
        captured.args, captured.kwargs, captured.caught = call.call_args, call.call_kwargs, True
    finally:
        if had_own:
            setattr(module, call_method, original)
        else:
            delattr(module, call_method)


def compile_exported(exported: Any, inductor_configs: dict[str, Any] | None = None) -> Compiled:
    """Compile an ExportedProgram here (in a worker) into a package without its weights."""
    import torch
    from torch._inductor.package.package import package_aoti

    from ..cuda import emulation

    if not isinstance(exported, torch.export.ExportedProgram):
        raise InvalidArgument(
            f"compile takes a torch.export.ExportedProgram, not {type(exported).__name__}: "
            "export the module first (torch.export.export(module, args, kwargs))"
        )
    if exported.example_inputs is None:
        raise InvalidArgument("the ExportedProgram has no example inputs: export it with its example arguments")
    options = {**(inductor_configs or {}), **PACKAGE_WITHOUT_WEIGHTS}
    args, kwargs = exported.example_inputs
    with emulation.suspended():
        artifacts = torch._inductor.aot_compile(exported.module(), args, kwargs, options=options)
        files = [artifact for artifact in artifacts if isinstance(artifact, str)]
        archive = io.BytesIO()
        package_aoti(archive, files)
    return Compiled(archive.getvalue())


def compile(
    module: Any,
    example_args: tuple = (),
    example_kwargs: dict[str, Any] | None = None,
    *,
    duration: float = 1500,
    inductor_configs: dict[str, Any] | None = None,
) -> Compiled:
    """Export and compile `module` for the example inputs, in a worker; returns the package without weights."""
    import torch

    if not isinstance(module, torch.nn.Module):
        raise InvalidArgument(f"zerogpu.aot.compile takes a torch.nn.Module, not {type(module).__name__}")
    if not isinstance(example_args, tuple):
        raise InvalidArgument(f"example_args must be a tuple of the module's arguments, not {type(example_args).__name__}")

    @GPU(duration=duration)
    def compile_in_worker(example_args: tuple, example_kwargs: dict[str, Any]) -> Compiled:
        exported = torch.export.export(module, args=example_args, kwargs=example_kwargs)
        return compile_exported(exported, inductor_configs)

    return compile_in_worker(example_args, dict(example_kwargs or {}))


def apply(compiled: Compiled, module: Any, call_method: str = "forward") -> None:
    """Make `module.<call_method>` run the compiled package, bound to the module's own weights."""
    if not isinstance(compiled, Compiled):
        raise InvalidArgument(f"apply takes what zerogpu.aot.compile returned, not {type(compiled).__name__}")
    setattr(module, call_method, Bound(compiled, module))


def save(compiled: Compiled, folder: str | os.PathLike[str]) -> Path:
    """Write the package to `folder`/package.pt2 (owner only); returns the file's path."""
    if not isinstance(compiled, Compiled):
        raise InvalidArgument(f"save takes what zerogpu.aot.compile returned, not {type(compiled).__name__}")
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    target = path / PACKAGE_FILENAME
    partial = target.with_suffix(".partial")
    with open(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as file:
        file.write(compiled.archive)
    os.replace(partial, target)  # a reader never sees half a package
    return target


def read(folder: str | os.PathLike[str]) -> Compiled:
    """The package saved in `folder` (or the .pt2 file itself)."""
    path = Path(folder)
    file = path if path.suffix == ".pt2" else path / PACKAGE_FILENAME
    try:
        return Compiled(file.read_bytes())
    except OSError as exc:
        raise InvalidArgument(
            f"no compiled package at {file} ({exc.strerror}): compile it and save it there first"
        ) from exc


def load(module: Any, folder: str | os.PathLike[str], call_method: str = "forward") -> Compiled:
    """Apply the package saved in `folder` to `module`; returns it."""
    compiled = read(folder)
    apply(compiled, module, call_method)
    return compiled


def load_blocks(module: Any, folder: str | os.PathLike[str], names: list[str]) -> int:
    """Apply `folder`/<class name>/package.pt2 to every block of `module` of those classes; how many got one."""
    packages: dict[str, Compiled] = {name: read(Path(folder) / name) for name in names}
    applied = 0
    for block in module.modules():
        compiled = packages.get(type(block).__name__)
        if compiled is not None:
            apply(compiled, block)
            applied += 1
    return applied


__all__ = ["Compiled", "capture", "compile", "compile_exported", "apply", "save", "read", "load", "load_blocks"]
