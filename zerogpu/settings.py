"""What the environment says: every ZEROGPU_* variable is read here and only here.

Settings are read when asked for, not at import, so a test or `zerogpu run`
can change the environment before the first call.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

from .errors import InvalidArgument

TRUE_WORDS = {"1", "true", "yes", "on"}
FALSE_WORDS = {"", "0", "false", "no", "off"}
BACKENDS = ("cuda", "emulated")


def flag(name: str, default: bool = False) -> bool:
    """A boolean variable: 1/true/yes/on or 0/false/no/off."""
    value = os.environ.get(name)
    if value is None:
        return default
    word = value.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise InvalidArgument(f"{name}={value!r} is not a boolean: use 1 or 0")


def number(name: str, default: float, *, minimum: float = 0.0) -> float:
    """A non-negative number of seconds, bytes or items."""
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    try:
        parsed = float(value)
    except ValueError:
        raise InvalidArgument(f"{name}={value!r} is not a number") from None
    if parsed < minimum:
        raise InvalidArgument(f"{name}={value!r} must be at least {minimum:g}")
    return parsed


def enabled() -> bool:
    """ZEROGPU=1 turns the decorator on; otherwise it returns functions unchanged."""
    return flag("ZEROGPU")


def backend() -> str | None:
    """ZEROGPU_BACKEND: 'cuda' or 'emulated'; None lets zerogpu pick (cuda when a GPU is visible)."""
    value = os.environ.get("ZEROGPU_BACKEND", "").strip().lower()
    if not value:
        return None
    if value not in BACKENDS:
        raise InvalidArgument(f"ZEROGPU_BACKEND={value!r} is unknown: use 'cuda' or 'emulated'")
    return value


def emulated_gpus() -> int:
    """ZEROGPU_EMULATED_GPUS: how many devices the emulated backend declares (default 1)."""
    return int(number("ZEROGPU_EMULATED_GPUS", 1, minimum=1))


def idle_timeout() -> float:
    """ZEROGPU_IDLE_TIMEOUT: seconds a worker stays warm after a call (0: exit at once)."""
    return number("ZEROGPU_IDLE_TIMEOUT", 0.0)


def queue_timeout() -> float:
    """ZEROGPU_QUEUE_TIMEOUT: seconds a call waits for a GPU before NoGPUAvailable."""
    return number("ZEROGPU_QUEUE_TIMEOUT", 60.0)


def timeout_grace() -> float:
    """ZEROGPU_TIMEOUT_GRACE: seconds a call may run past its duration before it is killed (default 1)."""
    return number("ZEROGPU_TIMEOUT_GRACE", 1.0)


def cuda_visible_devices() -> str | None:
    """CUDA_VISIBLE_DEVICES, CUDA's own list of the GPUs this process may use; None when unset."""
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def daily_quotas() -> dict[str, float]:
    """ZEROGPU_QUOTA: daily GPU seconds by tier, e.g. "anonymous=600,free=900,pro=3600,app=7200".

    Tiers not named keep ZeroGPU's defaults (anonymous 120, free 210, pro 1500);
    the app's own account (tier `app`) has no daily quota unless named here.
    """
    value = os.environ.get("ZEROGPU_QUOTA", "")
    return tier_seconds([part for part in value.split(",") if part.strip()], "ZEROGPU_QUOTA")


def tier_seconds(items: list[str], where: str) -> dict[str, float]:
    """['pro=3600', 'free=900'] as {'pro': 3600.0, 'free': 900.0}; `where` names the source in errors."""
    table: dict[str, float] = {}
    for item in items:
        tier, sep, seconds = item.partition("=")
        try:
            table[tier.strip()] = float(seconds)
        except ValueError:
            sep = ""
        if not sep:
            raise InvalidArgument(f"{where} {item!r}: write TIER=SECONDS, e.g. pro=3600")
    return table


def app_name() -> str | None:
    """ZEROGPU_APP: the name of the app's own quota account (`zerogpu run` sets it to the script)."""
    return os.environ.get("ZEROGPU_APP", "").strip() or None


def visitor_tiers() -> dict[str, str]:
    """ZEROGPU_TIERS: the tier of each logged-in user, e.g. "alice=pro,bob=free" (others: free)."""
    value = os.environ.get("ZEROGPU_TIERS", "")
    table: dict[str, str] = {}
    for item in (part for part in value.split(",") if part.strip()):
        user, sep, tier = item.partition("=")
        if not sep or not user.strip() or not tier.strip():
            raise InvalidArgument(f"ZEROGPU_TIERS {item!r}: write USER=TIER, e.g. alice=pro")
        table[user.strip()] = tier.strip()
    return table


def trusted_proxies() -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """ZEROGPU_TRUSTED_PROXIES: addresses or CIDRs whose forwarding headers name the client.

    Empty by default: only the socket's peer counts, since any client can
    write an X-Forwarded-For header.
    """
    value = os.environ.get("ZEROGPU_TRUSTED_PROXIES", "")
    networks = []
    for item in (part.strip() for part in value.split(",") if part.strip()):
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise InvalidArgument(
                f"ZEROGPU_TRUSTED_PROXIES {item!r} is not an address or a network: "
                "write e.g. 127.0.0.1,10.0.0.0/8"
            ) from None
    return networks


def scheduler_socket() -> str | None:
    """ZEROGPU_SCHEDULER: the node daemon's unix socket; unset means the embedded scheduler."""
    return os.environ.get("ZEROGPU_SCHEDULER") or None


def ledger() -> str | None:
    """ZEROGPU_LEDGER: the quota ledger, a postgresql:// URL (a fleet's) or a file path; unset: the file
    quota.sqlite3 under data_dir()."""
    return os.environ.get("ZEROGPU_LEDGER", "").strip() or None


def emulated_faults() -> str:
    """ZEROGPU_EMULATED_FAULTS: faults the emulated engine injects, for tests (see zerogpu.cuda.engine)."""
    return os.environ.get("ZEROGPU_EMULATED_FAULTS", "")


def data_dir() -> Path:
    """ZEROGPU_DATA_DIR, else $XDG_DATA_HOME/zerogpu, else ~/.local/share/zerogpu."""
    explicit = os.environ.get("ZEROGPU_DATA_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "zerogpu"
