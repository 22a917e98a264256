"""zerogpu: share GPUs between Python apps."""
from .errors import *  # noqa: F401,F403
