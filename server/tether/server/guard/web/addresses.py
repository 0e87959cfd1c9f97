"""Who a web request comes from: the connection's address, or, behind a
trusted reverse proxy, the address the proxy says it forwarded for."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(spec: str) -> list[Network]:
    return [ipaddress.ip_network(p.strip(), strict=False) for p in spec.split(",") if p.strip()]


def within(address: str, networks: Iterable[Network]) -> bool:
    """Whether an address (a bare IP; anything else is not) is in one of the networks."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def client_ip(remote: str | None, forwarded_for: str, trusted: Iterable[Network]) -> str:
    """The browser's address: the connection's, unless that is a trusted
    proxy; then the right-most X-Forwarded-For hop that is not trusted."""
    trusted = list(trusted)
    address = remote or ""
    if not within(address, trusted):
        return address
    for hop in reversed([h.strip() for h in forwarded_for.split(",") if h.strip()]):
        address = _address_of(hop)
        if not within(address, trusted):
            break
    return address


def _address_of(hop: str) -> str:
    """A hop's address, as proxies write it: bare, or with a port
    ("192.0.2.1:8080", "[2001:db8::1]:443") or brackets ("[2001:db8::1]")."""
    if hop.startswith("["):
        end = hop.find("]")
        return hop[1:end] if end > 0 else hop
    if hop.count(":") == 1:
        return hop.split(":", 1)[0]
    return hop
