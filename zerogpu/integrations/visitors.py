"""Whose quota a web request spends: the visitor's identity, worked out the same way for every framework.

In this order:

1. the app's resolver, registered with `zerogpu.identify_visitors(fn)`:
   `fn(request)` returns `(user, tier)` or None to go on;
2. a logged-in user (Gradio's `request.username`, Starlette's
   `scope["user"]`), tier from ZEROGPU_TIERS (default free);
3. otherwise an anonymous account per client address.

The address is the socket's peer. Forwarding headers (X-Forwarded-For,
Forwarded, X-Real-IP) count only when that peer is one of
ZEROGPU_TRUSTED_PROXIES: anyone can write a header, and a header that
named the account would let a client spend someone else's quota.

Each kind of account has its own prefix, so that no name of one kind can
be the name of another: a user called "anonymous:1.2.3.4" logs in as
"user:anonymous:1.2.3.4" and leaves that address's quota alone.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping

from .. import settings
from ..errors import InvalidArgument
from ..identity import VISITOR_TIERS, Identity, clip, visitor_resolver

RESOLVED = "visitor:"
USER = "user:"
ANONYMOUS = "anonymous:"
UNKNOWN_ADDRESS = "unknown"

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def visitor_identity(request: object, *, peer: str | None, headers: Mapping[str, str],
                     username: str | None) -> Identity:
    """The identity a web request's GPU calls run as.

    `request` is what the app's resolver gets; `peer` the socket's remote
    address (None when unknown); `headers` the request's headers; `username`
    the logged-in user, if any.
    """
    resolver = visitor_resolver()
    if resolver is not None:
        chosen = resolver(request)
        if chosen is not None:
            return resolved(chosen, resolver)
    if username:
        return Identity(clip(USER + str(username)), tier_of(str(username)))
    return Identity(ANONYMOUS + client_address(peer, headers), "anonymous")


def resolved(chosen: object, resolver: object) -> Identity:
    """The Identity for what the app's resolver returned; a clear error for anything else."""
    name = getattr(resolver, "__qualname__", repr(resolver))
    if not (isinstance(chosen, tuple) and len(chosen) == 2):
        raise InvalidArgument(
            f"the visitor resolver {name} returned {chosen!r}: return (user, tier) or None"
        )
    user, tier = chosen
    if not isinstance(user, str) or not user.strip():
        raise InvalidArgument(f"the visitor resolver {name} returned the user {user!r}: use a non-empty string")
    if tier not in VISITOR_TIERS:
        raise InvalidArgument(
            f"the visitor resolver {name} returned the tier {tier!r}: use one of {', '.join(VISITOR_TIERS)}"
        )
    return Identity(clip(RESOLVED + user), tier)


def tier_of(username: str) -> str:
    """A logged-in user's tier, from ZEROGPU_TIERS; free for anyone it does not name."""
    tiers = settings.visitor_tiers()
    for user, tier in tiers.items():
        if tier not in VISITOR_TIERS:
            raise InvalidArgument(
                f"ZEROGPU_TIERS gives {user!r} the tier {tier!r}: use one of {', '.join(VISITOR_TIERS)}"
            )
    return tiers.get(username, "free")


# -- the client's address -----------------------------------------------------------------


def client_address(peer: str | None, headers: Mapping[str, str]) -> str:
    """The address of the client: the peer, or what a trusted proxy in front of it says."""
    address = parse_address(peer)
    if address is None:
        return UNKNOWN_ADDRESS if not peer else clip(peer)
    proxies = settings.trusted_proxies()
    if not trusted(address, proxies):
        return str(address)
    # Walk the chain from the nearest hop: the first address not a trusted
    # proxy is the client; what lies beyond it, the client could have written.
    for hop in reversed(forwarded_chain(headers)):
        if hop is None:
            break  # a hop that is not an address (obfuscated, "unknown"): stop at the proxy before it
        address = hop
        if not trusted(hop, proxies):
            break
    return str(address)


def trusted(address: Address, proxies: Iterable[Network]) -> bool:
    return any(address.version == network.version and address in network for network in proxies)


def forwarded_chain(headers: Mapping[str, str]) -> list[Address | None]:
    """The client-to-proxy chain a proxy reported, from the first of the headers that is present."""
    value = header(headers, "x-forwarded-for")
    if value:
        return [parse_address(part) for part in value.split(",")]
    value = header(headers, "forwarded")
    if value:
        return [parse_address(directive(element, "for")) for element in value.split(",")]
    value = header(headers, "x-real-ip")
    if value:
        return [parse_address(value)]
    return []


def header(headers: Mapping[str, str], name: str) -> str:
    """A header's value, case-insensitively; repeated headers joined with commas, as HTTP allows."""
    getlist = getattr(headers, "getlist", None)
    if callable(getlist):
        values = list(getlist(name))
    else:
        values = [value for key, value in headers.items() if key.lower() == name]
    return ",".join(str(value) for value in values)


def directive(element: str, key: str) -> str | None:
    """The value of `key` in one element of a Forwarded header (RFC 7239), e.g. for=192.0.2.1."""
    for pair in element.split(";"):
        name, sep, value = pair.partition("=")
        if sep and name.strip().lower() == key:
            return value.strip().strip('"')
    return None


def parse_address(text: str | None) -> Address | None:
    """An IP address from '1.2.3.4', '1.2.3.4:80', '[2001:db8::1]:80' or '2001:db8::1'; None if it is none."""
    if not text:
        return None
    text = text.strip().strip('"')
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address
