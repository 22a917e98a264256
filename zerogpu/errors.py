"""The one error family of zerogpu.

Every error zerogpu raises derives from `ZeroGPUError`. Each class stands for
one way a call can fail, and each message says what happened and what to do.
"""

from __future__ import annotations


class ZeroGPUError(Exception):
    """Base class of every error raised by zerogpu."""


class InvalidArgument(ZeroGPUError, ValueError):
    """A value given to zerogpu is wrong; raised before any resource is taken."""


class SnapshotError(ZeroGPUError):
    """A snapshot segment could not be created, attached or read."""


class CudaError(ZeroGPUError):
    """A CUDA driver call failed.

    `call` names the driver function, `code` and `name` the CUDA error.
    """

    def __init__(self, message: str, call: str = "", code: int = 0, name: str = ""):
        super().__init__(message)
        self.call = call
        self.code = code
        self.name = name

    def __reduce__(self):
        return (type(self), (str(self), self.call, self.code, self.name))


class CudaUnavailable(CudaError):
    """The CUDA driver library (libcuda.so.1) could not be loaded."""


class CudaInitialized(ZeroGPUError):
    """CUDA was initialized in the parent process before zerogpu could emulate it."""


class SerializationError(ZeroGPUError):
    """Arguments or a result could not be sent between the caller and its worker."""


class RemoteError(ZeroGPUError):
    """An exception raised in the worker that could not be rebuilt in the caller.

    `type_name` is the qualified name of the original exception type, `message`
    its text and `traceback` the worker's formatted traceback.
    """

    def __init__(self, type_name: str, message: str, traceback: str = ""):
        super().__init__(f"{type_name}: {message}" if message else type_name)
        self.type_name = type_name
        self.message = message
        self.traceback = traceback

    def __reduce__(self):
        return (type(self), (self.type_name, self.message, self.traceback))


class WorkerCrashed(ZeroGPUError):
    """The worker process died before it returned a result.

    `exitcode` is set when it exited, `signal` when a signal killed it.
    """

    def __init__(self, message: str, exitcode: int | None = None, signal: int | None = None):
        super().__init__(message)
        self.exitcode = exitcode
        self.signal = signal

    def __reduce__(self):
        return (type(self), (str(self), self.exitcode, self.signal))


class CallTimeout(ZeroGPUError):
    """The call ran past its duration and its worker was killed."""


class AttachError(ZeroGPUError):
    """The worker could not attach its GPU (CUDA context creation failed)."""


class RestoreError(ZeroGPUError):
    """The worker could not restore the model's weights onto its GPU."""


class NoGPUAvailable(ZeroGPUError):
    """No GPU became free for the call within the queue timeout."""


class QuotaExceeded(ZeroGPUError):
    """The caller's daily GPU quota does not cover the requested duration."""


class SchedulerError(ZeroGPUError):
    """The scheduler (embedded or the node daemon) refused or failed a request."""


class Cancelled(ZeroGPUError):
    """The caller gave up on the call (cancelled task, closed generator) before it ended."""


__all__ = [
    "ZeroGPUError",
    "InvalidArgument",
    "SnapshotError",
    "CudaError",
    "CudaUnavailable",
    "CudaInitialized",
    "SerializationError",
    "RemoteError",
    "WorkerCrashed",
    "CallTimeout",
    "AttachError",
    "RestoreError",
    "NoGPUAvailable",
    "QuotaExceeded",
    "SchedulerError",
    "Cancelled",
]
