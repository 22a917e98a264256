"""The process-per-call designs a user would try instead of zerogpu, each in a process of its own.

- `ForkPerCall`: a server process holds the weights in ordinary memory and
  forks a child per call that moves them with `model.to(device)`, runs the
  model and pickles the output back through a pipe.
- `LoadedPool`: a `ProcessPoolExecutor` of one worker that loaded the model
  onto the device once; each call is `submit(...).result()`.

Both are forked before the bench's process opens any CUDA context (it never
does until the in-process alternatives), from a thread that never ran torch
(a child forked by one that did waits forever for its OpenMP pool), so their
calls can be timed in turn with zerogpu's, round after round. The "fork"
start method also leaves no resource tracker process and no temporary folder.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import pickle
from pathlib import Path

import torch

from .model import Stack, run_with, skeleton

RIVALS = {
    "fork_to_device": "fork per call + model.to(device)",
    "loaded_pool": "process pool, model loaded",
}


def on_fresh_thread(make):
    """What `make()` returns, run on a new thread (which forks with no OpenMP pool)."""
    import threading

    made: list = []
    failed: list[BaseException] = []

    def run() -> None:
        try:
            made.append(make())
        except BaseException as error:  # noqa: BLE001 - raised again below
            failed.append(error)

    thread = threading.Thread(target=run, name="zerogpu-bench-fork")
    thread.start()
    thread.join()
    if failed:
        raise failed[0]
    return made[0]


def _device(backend: str) -> torch.device:
    return torch.device("cuda" if backend == "cuda" else "cpu")


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def _serve_forks(connection, weights_file: str, layers: int, width: int, backend: str) -> None:
    """In the server process: one fork per request, the output sent back."""
    import threading

    from safetensors.torch import load_file

    # Ordinary (pageable, private) memory, as an app that forks per call holds its model.
    # Loaded on another thread: a child forked by a thread that ran a parallel torch op
    # waits forever for that thread's OpenMP pool (see zerogpu.call.worker.Spawner).
    loaded: dict[str, torch.Tensor] = {}
    loader = threading.Thread(target=lambda: loaded.update(
        {name: tensor.clone() for name, tensor in load_file(weights_file).items()}))
    loader.start()
    loader.join()
    weights = loaded
    shape, device = skeleton(layers, width), _device(backend)
    connection.send("ready")
    while (request := connection.recv_bytes()) != b"":
        x = pickle.loads(request)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(read_end)
                output = run_with(shape, {name: t.to(device, copy=True) for name, t in weights.items()}, x)
                data = pickle.dumps(output)
                view = memoryview(data)
                while view:
                    view = view[os.write(write_end, view):]
            finally:
                os._exit(0)
        os.close(write_end)
        data = _read_all(read_end)
        os.close(read_end)
        os.waitpid(pid, 0)
        connection.send_bytes(data)


class ForkPerCall:
    def __init__(self, weights_file: Path, layers: int, width: int, backend: str) -> None:
        context = multiprocessing.get_context("fork")
        self._connection, theirs = context.Pipe()
        self._process = context.Process(target=_serve_forks, args=(theirs, str(weights_file), layers, width, backend),
                                         name="zerogpu-bench-fork-per-call", daemon=True)
        on_fresh_thread(self._process.start)
        theirs.close()
        if self._connection.recv() != "ready":  # pragma: no cover - the server says nothing else
            raise RuntimeError("the fork-per-call server did not start")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # Plain pickle: multiprocessing's own would pass a tensor's memory through a
        # descriptor-sharing server that leaves a temporary folder behind.
        self._connection.send_bytes(pickle.dumps(x))
        return pickle.loads(self._connection.recv_bytes())

    def close(self) -> None:
        try:
            self._connection.send_bytes(b"")
        except OSError:
            pass
        self._process.join(30)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._connection.close()


_loaded: tuple[Stack, dict[str, torch.Tensor]] | None = None


def _load(weights_file: str, layers: int, width: int, backend: str) -> None:
    global _loaded
    from safetensors.torch import load_file

    device = _device(backend)
    _loaded = skeleton(layers, width), {name: t.to(device) for name, t in load_file(weights_file).items()}


def _forward(x: bytes) -> bytes:
    shape, weights = _loaded
    return pickle.dumps(run_with(shape, weights, pickle.loads(x)))


class LoadedPool:
    def __init__(self, weights_file: Path, layers: int, width: int, backend: str) -> None:
        self._executor = concurrent.futures.ProcessPoolExecutor(
            1, mp_context=multiprocessing.get_context("fork"), initializer=_load,
            initargs=(str(weights_file), layers, width, backend))
        # Its worker is forked by the first submit: started, model loaded.
        on_fresh_thread(lambda: self._executor.submit(os.getpid)).result()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return pickle.loads(self._executor.submit(_forward, pickle.dumps(x)).result())

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
