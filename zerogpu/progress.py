"""A progress bar for long byte copies (packing a large model), drawn with rich on stderr."""

from __future__ import annotations

from typing import Callable


def bytes_progress(description: str, total: int) -> Callable[[int], None]:
    """A callback to give each copied chunk's size; the bar closes itself when full."""
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
    bar.start()
    done = 0

    def advance(nbytes: int) -> None:
        nonlocal done
        done += nbytes
        bar.update(task, completed=done)
        if done >= total:
            bar.stop()

    return advance
