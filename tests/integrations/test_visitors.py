"""Whose quota a web request spends: the resolver, a logged-in user, else the client's address."""

from __future__ import annotations

import pytest

import zerogpu
from zerogpu.errors import InvalidArgument
from zerogpu.identity import Identity
from zerogpu.integrations.visitors import client_address, visitor_identity


@pytest.fixture(autouse=True)
def clean(monkeypatch):
    for name in ("ZEROGPU_TIERS", "ZEROGPU_TRUSTED_PROXIES"):
        monkeypatch.delenv(name, raising=False)
    yield
    zerogpu.identify_visitors(None)


def who(peer="198.51.100.4", headers=None, username=None, request=None) -> Identity:
    return visitor_identity(request, peer=peer, headers=headers or {}, username=username)


def test_an_anonymous_visitor_gets_an_account_per_address():
    assert who() == Identity("anonymous:198.51.100.4", "anonymous")
    assert who("198.51.100.5") != who("198.51.100.4")
    assert who("::ffff:198.51.100.4") == who()  # the same client over IPv4 or IPv6-mapped
    assert who(None).user == "anonymous:unknown"


def test_forwarding_headers_are_ignored_unless_the_peer_is_a_trusted_proxy(monkeypatch):
    spoofed = {"X-Forwarded-For": "203.0.113.9", "X-Real-IP": "203.0.113.9", "Forwarded": "for=203.0.113.9"}
    assert who(headers=spoofed).user == "anonymous:198.51.100.4"
    monkeypatch.setenv("ZEROGPU_TRUSTED_PROXIES", "10.0.0.0/8, 192.0.2.1")
    assert who(headers=spoofed).user == "anonymous:198.51.100.4"  # not a proxy of ours
    assert who("192.0.2.1", headers=spoofed).user == "anonymous:203.0.113.9"


def test_the_client_is_the_first_untrusted_hop_from_the_nearest(monkeypatch):
    monkeypatch.setenv("ZEROGPU_TRUSTED_PROXIES", "10.0.0.0/8")
    # A client may write any X-Forwarded-For of its own: only what our proxies appended counts.
    assert client_address("10.0.0.1", {"x-forwarded-for": "1.1.1.1, 203.0.113.9, 10.0.0.2"}) == "203.0.113.9"
    assert client_address("10.0.0.1", {"X-Real-IP": "203.0.113.9"}) == "203.0.113.9"
    assert client_address("10.0.0.1", {"Forwarded": 'for="[2001:db8::7]:443";proto=https'}) == "2001:db8::7"
    assert client_address("10.0.0.1", {"X-Forwarded-For": "203.0.113.9:5555"}) == "203.0.113.9"
    assert client_address("10.0.0.1", {"Forwarded": "for=_hidden, for=10.0.0.3"}) == "10.0.0.3"
    assert client_address("10.0.0.1", {}) == "10.0.0.1"


def test_a_logged_in_user_gets_their_tier_from_zerogpu_tiers(monkeypatch):
    assert who(username="bob") == Identity("user:bob", "free")
    monkeypatch.setenv("ZEROGPU_TIERS", "alice=pro, bob=anonymous")
    assert who(username="alice") == Identity("user:alice", "pro")
    assert who(username="bob").tier == "anonymous"


@pytest.mark.parametrize("value, message", [
    ("alice", "write USER=TIER"),
    ("alice=gold", "tier 'gold'"),
    ("alice=app", "tier 'app'"),  # the app's own account is no visitor's
])
def test_a_bad_zerogpu_tiers_is_a_clear_error(monkeypatch, value, message):
    monkeypatch.setenv("ZEROGPU_TIERS", value)
    with pytest.raises(InvalidArgument, match=message):
        who(username="alice")


def test_a_bad_trusted_proxy_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("ZEROGPU_TRUSTED_PROXIES", "10.0.0.0/8,proxy.local")
    with pytest.raises(InvalidArgument, match="'proxy.local' is not an address"):
        who()


def test_names_of_one_kind_never_spend_another_kinds_account():
    assert who(username="anonymous:198.51.100.4") != who()
    zerogpu.identify_visitors(lambda request: ("anonymous:198.51.100.4", "anonymous"))
    assert who() == Identity("visitor:anonymous:198.51.100.4", "anonymous")


def test_the_apps_resolver_comes_first_and_none_falls_through():
    seen = []

    @zerogpu.identify_visitors
    def by_token(request):
        seen.append(request)
        return ("team-a", "pro") if request == "token-a" else None

    assert who(request="token-a", username="alice") == Identity("visitor:team-a", "pro")
    assert who(request="other", username="alice") == Identity("user:alice", "free")
    assert seen == ["token-a", "other"]


@pytest.mark.parametrize("returned, message", [
    ("team-a", "return \\(user, tier\\) or None"),
    (("", "pro"), "non-empty string"),
    (("team-a", "gold"), "tier 'gold'"),
    (("team-a", "app"), "tier 'app'"),
])
def test_a_resolver_that_returns_something_else_is_a_clear_error(returned, message):
    zerogpu.identify_visitors(lambda request: returned)
    with pytest.raises(InvalidArgument, match=message):
        who()
