"""What every benchmark reports alongside its figures: the machine it ran on, and sizes."""

from __future__ import annotations

import argparse
import os
import platform
from datetime import date

import numpy as np
import torch

from zerogpu.errors import InvalidArgument
from zerogpu.units import describe_size, parse_size

__all__ = ["describe_size", "machine", "size_argument"]


def machine(**extra: object) -> dict:
    """The date, platform, CPUs, Python, torch and numpy versions, load, and `extra`."""
    return {
        "date": date.today().isoformat(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        **extra,
    }


def size_argument(text: str) -> int:
    """argparse's type= for sizes such as 1GB or 512MiB (binary units)."""
    try:
        return parse_size(text)
    except InvalidArgument as error:
        raise argparse.ArgumentTypeError(str(error)) from None
