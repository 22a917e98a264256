"""A progress bar for long byte copies (packing a large model), drawn with rich on stderr."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator


@contextlib.contextmanager
def bytes_progress(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """A callback to give each copied chunk's size; the bar is closed on leaving, however the copy ended."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    bar = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        console=Console(stderr=True),
        transient=False,
    )
    task = bar.add_task(description, total=total)

    def advance(nbytes: int) -> None:
        bar.advance(task, nbytes)

    with bar:
        yield advance
