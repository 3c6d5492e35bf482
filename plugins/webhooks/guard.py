"""Where a webhook may go: the SSRF guard.

A webhook URL comes from an operator or from an admin API caller, and the
server sending to it sits inside the deployment's network: a URL naming the
metadata service, a database port or localhost would let a caller reach what
only the server can. So, by default:

- only `https` URLs;
- the host name is resolved at every attempt, and every address it resolves
  to is checked: loopback, private (RFC 1918), carrier-grade NAT, link-local
  (169.254.0.0/16, where the cloud metadata service 169.254.169.254 lives),
  unique-local (fc00::/7), multicast, reserved and unspecified addresses are
  refused, and so are IPv4 addresses mapped into IPv6 that are;
- the connection goes to the address that was checked (a second resolution
  could answer differently: a DNS rebind), with the name kept for the Host
  header and TLS;
- redirects are not followed (a 3xx is a failed attempt).

`allow_private = true` lifts all of it for an endpoint (or for every one);
`allow = [...]` lists networks ("10.1.0.0/16", "127.0.0.1") or host names that
may be reached, plain http included.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Iterable
from urllib.parse import urlsplit

import attrs
import trio

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Blocked beyond what `ipaddress` flags: shared address space (RFC 6598) and
#: "this network".
_EXTRA_BLOCKED = (ipaddress.ip_network("100.64.0.0/10"), ipaddress.ip_network("0.0.0.0/8"))


class Refused(Exception):
    """The URL may not be called; the message says why."""


@attrs.frozen
class Target:
    """A URL that passed the guard: where to connect, and what to send."""

    scheme: str
    host: str
    port: int
    #: The path and query to request.
    path: str
    #: The checked address the connection goes to.
    address: str

    @property
    def origin(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


@attrs.frozen
class Policy:
    allow_private: bool = False
    #: Networks, and host names (lower case), that may be reached.
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    hosts: frozenset[str] = frozenset()

    @classmethod
    def of(cls, allow_private: bool, allow: Iterable[str]) -> "Policy":
        networks, hosts = [], set()
        for entry in allow:
            try:
                networks.append(ipaddress.ip_network(entry.strip(), strict=False))
            except ValueError:
                name = entry.strip().lower().rstrip(".")
                if not name or "/" in name or " " in name:
                    raise ValueError(f"{entry!r} in 'allow' is neither a network nor a host name") from None
                hosts.add(name)
        return cls(allow_private, tuple(networks), frozenset(hosts))


def blocked_reason(address: IPAddress) -> str | None:
    """Why an address may not be reached by default, or None."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return blocked_reason(address.ipv4_mapped)
    if str(address) == "169.254.169.254":
        return "the cloud metadata address"
    for flag in ("loopback", "link_local", "multicast", "unspecified", "reserved", "private"):
        if getattr(address, f"is_{flag}"):
            return f"a {flag.replace('_', '-')} address"
    if isinstance(address, ipaddress.IPv4Address) and any(address in net for net in _EXTRA_BLOCKED):
        return "a private address"
    if not address.is_global:
        return "not a public address"
    return None


def check_url(url: str, policy: Policy) -> tuple[str, str, int, str]:
    """(scheme, host, port, path) of a URL the guard may let through, or
    `Refused` for one it never would (before any resolution)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Refused("a webhook URL is http(s)://host/path")
    if parts.username or parts.password:
        raise Refused("a webhook URL carries no user name or password")
    if parts.fragment:
        raise Refused("a webhook URL has no #fragment")
    host = parts.hostname.lower().rstrip(".")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise Refused("the port of the webhook URL is not a number") from None
    if parts.scheme == "http" and not policy.allow_private and not _listed(host, policy):
        raise Refused("only https URLs are allowed (set allow_private, or allow the host, for plain http)")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.scheme, host, port, path


def _listed(host: str, policy: Policy) -> bool:
    if host in policy.hosts:
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(address in net for net in policy.networks)


async def resolve(url: str, policy: Policy) -> Target:
    """Resolve the URL's host now and check every address; the target pins the
    first one. Raises `Refused` saying which address was refused and why."""
    scheme, host, port, path = check_url(url, policy)
    try:
        literal: IPAddress | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        addresses = [literal]
    else:
        try:
            infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise Refused(f"cannot resolve {host}: {exc}") from None
        addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos))
        if not addresses:
            raise Refused(f"{host} resolves to no address")
    if not policy.allow_private and host not in policy.hosts:
        for address in addresses:
            if any(address in net for net in policy.networks):
                continue
            reason = blocked_reason(address)
            if reason is not None:
                raise Refused(f"{host} resolves to {address}, {reason}; allow it with allow_private or the endpoint's allow list")
    return Target(scheme, host, port, path, str(addresses[0]))
