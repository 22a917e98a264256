"""The compiled copy engine (private)."""
from ._engine import *  # noqa: F401,F403
