"""Outbound HTTP to URLs that users supply, guarded against server-side request forgery (SSRF).

A URL a user hands the service (a dataset URL; later webhooks and adapter imports) must not let
them reach what only the server can reach: its own loopback services, the private network, the
cloud metadata endpoint (169.254.169.254). The defences, in order:

1. Scheme: only http:// and https://, for the first request and for every redirect.
2. Addresses: the host name is resolved (every address) and refused unless every address is
   public (check_address): loopback, private, link-local, shared (CGNAT), multicast, broadcast,
   reserved, documentation and unique-local ranges are refused, and so is the IPv4 address
   embedded in an IPv4-mapped, NAT64 or 6to4 IPv6 address. Odd literal spellings
   (http://2130706433/, http://0x7f.0.0.1/) need no special case: the resolver turns them into
   127.0.0.1 and the check runs on what it returns.
3. Pinning: the connection goes to the checked address, never to the name, so a DNS answer that
   changes between the check and the connection (DNS rebinding) cannot redirect it. The request
   keeps the original Host header, and for https the TLS SNI and certificate verification use
   the original host name (httpcore's "sni_hostname" request extension).
4. Redirects are followed here rather than by httpx, at most max_redirects hops, and each hop is
   checked as in 1-3.
5. Bounds: a timeout for every network step, an optional deadline for the whole exchange
   including the body (checked between reads by GuardedResponse.iter_bytes), and only the gzip and
   deflate content encodings, which expand by at most about 1000x per network read; the caller
   caps the decoded bytes it keeps.

Environment proxies and .netrc are ignored (trust_env=False), since a request through a proxy
could not be pinned; SSL_CERT_FILE and SSL_CERT_DIR are still honoured. allow_private=True (a
trusted, self-hosted deployment) skips the address check (2) only.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import re
import socket
import ssl
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TypeAlias
from urllib.parse import urlsplit

import httpx

from app.errors import TuneserveError

__all__ = [
    "MAX_REDIRECTS",
    "DeadlineExceeded",
    "Forbidden",
    "GuardedResponse",
    "IPAddress",
    "OutboundError",
    "TooManyRedirects",
    "Unresolvable",
    "UnsupportedEncoding",
    "check_address",
    "check_url_literal",
    "literal_address",
    "open_guarded",
    "redact",
    "resolve",
    "resolve_public",
]

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
# Stand-ins for resolve() and check_address(), e.g. in tests.
Resolver: TypeAlias = Callable[[str, int], list[IPAddress]]
Checker: TypeAlias = Callable[[IPAddress], str | None]

MAX_REDIRECTS = 5
_SCHEMES = ("http", "https")
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# What httpx decodes with a bounded expansion; anything else (br, zstd, ...) is refused.
_ENCODINGS = frozenset({"identity", "gzip", "x-gzip", "deflate"})
_NUMERIC_HOST = re.compile(r"[0-9a-fA-FxX.]+")

_net = ipaddress.ip_network
_CLOUD_METADATA = frozenset(
    ipaddress.ip_address(a)
    for a in ("169.254.169.254", "169.254.170.2", "100.100.100.200", "fd00:ec2::254")
)
# Ranges that ipaddress's flags do not (in every Python version) mark as non-public, or that
# deserve a clearer name than "private".
_SPECIAL_RANGES: tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str], ...] = (
    (_net("0.0.0.0/8"), "an unspecified ('this network') address"),
    (_net("255.255.255.255/32"), "a broadcast address"),
    (_net("100.64.0.0/10"), "a shared (carrier-grade NAT) address"),
    (_net("192.0.0.0/24"), "an IETF protocol-assignment address"),
    (_net("192.0.2.0/24"), "a documentation address"),
    (_net("198.51.100.0/24"), "a documentation address"),
    (_net("203.0.113.0/24"), "a documentation address"),
    (_net("198.18.0.0/15"), "a benchmarking address"),
    (_net("240.0.0.0/4"), "a reserved address"),
    (_net("2001:db8::/32"), "a documentation address"),
    (_net("3fff::/20"), "a documentation address"),
    (_net("fc00::/7"), "a unique-local address"),
    (_net("fec0::/10"), "a site-local address"),
    (_net("::/96"), "an IPv4-compatible address (deprecated)"),
    (_net("::ffff:0:0:0/96"), "an IPv4-translated address"),
    (_net("64:ff9b:1::/48"), "a local-use NAT64 address"),
    (_net("100::/64"), "a discard-only address"),
    (_net("2001::/23"), "an IETF protocol-assignment address"),
)
_NAT64 = _net("64:ff9b::/96")


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


class OutboundError(TuneserveError):
    """A guarded request refused or abandoned. str() is a sentence without credentials."""

    code = "outbound_refused"


class Forbidden(OutboundError):
    """The URL points somewhere it may not. reason is set when a non-public host is why (with
    the address, unless the host is a name like "localhost"), and None for a refused scheme."""

    def __init__(
        self, message: str, *, address: IPAddress | None = None, reason: str | None = None
    ) -> None:
        super().__init__(message)
        self.address = address
        self.reason = reason


class Unresolvable(OutboundError):
    """The host name has no address (DNS failure)."""


class TooManyRedirects(OutboundError):
    pass


class DeadlineExceeded(OutboundError):
    pass


class UnsupportedEncoding(OutboundError):
    pass


def redact(url: str | httpx.URL, *, fallback: str = "the URL") -> str:
    """The URL without credentials, query string or fragment, which may hold secrets; fallback
    if it cannot be parsed."""
    try:
        parts = urlsplit(str(url))
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port is not None else ""
    except ValueError:
        return fallback
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}{port}{parts.path}"


# ---------------------------------------------------------------------------------------------
# Addresses
# ---------------------------------------------------------------------------------------------


def _shown(ip: IPAddress) -> str:
    """ip as people write it: ::ffff:127.0.0.1 rather than ::ffff:7f00:1 (Python < 3.13)."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return f"::ffff:{ip.ipv4_mapped}"
    return str(ip)


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> tuple[str, ipaddress.IPv4Address] | None:
    """The IPv4 address a connection to ip really reaches, for the forms that route to one."""
    if ip.ipv4_mapped is not None:
        return "an IPv4-mapped address", ip.ipv4_mapped
    if ip in _NAT64:
        return "a NAT64 address", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour is not None:
        return "a 6to4 address", ip.sixtofour
    return None


def _classify(ip: IPAddress) -> str | None:
    if ip.is_unspecified:
        return "an unspecified address"
    if ip.is_loopback:
        return "a loopback address"
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            kind, v4 = embedded
            reason = check_address(v4)
            return None if reason is None else f"{kind} embedding {v4}, {reason}"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_multicast:
        return "a multicast address"
    for network, label in _SPECIAL_RANGES:
        if ip.version == network.version and ip in network:
            return label
    if ip.is_private:
        return "a private address"
    if ip.is_reserved:
        return "a reserved address"
    if not ip.is_global:
        return "a non-public address"
    return None


def check_address(ip: IPAddress) -> str | None:
    """Why a connection to ip is refused (e.g. "a loopback address"), or None if it is public."""
    reason = _classify(ip)
    if reason is not None and ip in _CLOUD_METADATA:
        return f"{reason} (cloud metadata)"
    return reason


def literal_address(host: str) -> IPAddress | None:
    """host as an IP address if it is one in any spelling a resolver accepts; no DNS lookup."""
    host = host.strip("[]")
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    # inet_aton: what getaddrinfo accepts for IPv4 too (2130706433, 0x7f.1, 0177.0.0.1).
    if _NUMERIC_HOST.fullmatch(host):
        with contextlib.suppress(OSError):
            return ipaddress.IPv4Address(socket.inet_aton(host))
    return None


def _is_local_name(host: str) -> bool:
    name = host.rstrip(".").lower()
    return name == "localhost" or name.endswith(".localhost")


def check_url_literal(url: str) -> None:
    """Cheap check without DNS, for when a URL is submitted: refuse an http(s) URL whose host is
    "localhost" or a non-public IP literal. The full check happens when it is fetched."""
    try:
        host = urlsplit(url).hostname or ""
    except ValueError:
        return
    if _is_local_name(host):
        local = "a loopback host name"
        raise Forbidden(f"{redact(url)} points at {host.rstrip('.')}, {local}", reason=local)
    ip = literal_address(host)
    reason = None if ip is None else check_address(ip)
    if ip is not None and reason is not None:
        message = f"{redact(url)} resolves to {_shown(ip)}, {reason}"
        raise Forbidden(message, address=ip, reason=reason)


def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address of host (system resolver), in the resolver's order, without duplicates."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise Unresolvable(f"the host name {host} could not be resolved ({detail})") from exc
    addresses: list[IPAddress] = []
    for family, _type, _proto, _name, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6):
            ip = ipaddress.ip_address(str(sockaddr[0]))
            if ip not in addresses:
                addresses.append(ip)
    if not addresses:
        raise Unresolvable(f"the host name {host} has no IPv4 or IPv6 address")
    return addresses


def resolve_public(
    host: str,
    port: int,
    *,
    allow_private: bool,
    resolver: Resolver | None = None,
    checker: Checker | None = None,
    subject: str | None = None,
) -> list[IPAddress]:
    """The addresses of host; Forbidden, naming subject (default: host), unless every one is
    public or allow_private."""
    addresses = (resolver or resolve)(host, port)
    if not addresses:
        raise Unresolvable(f"the host name {host} has no address")
    if allow_private:
        return addresses
    check = checker or check_address
    for ip in addresses:
        reason = check(ip)
        if reason is not None:
            message = f"{subject or host} resolves to {_shown(ip)}, {reason}"
            raise Forbidden(message, address=ip, reason=reason)
    return addresses


# ---------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GuardedResponse:
    """The final response of a guarded request (redirects done, body not yet read)."""

    url: httpx.URL  # as the user sees it: host name (not the pinned address), after redirects
    address: IPAddress  # where the connection went
    response: httpx.Response
    deadline: float | None  # time.monotonic() by which the body must be read
    max_seconds: float | None

    def iter_bytes(self) -> Iterator[bytes]:
        """The decoded body as it arrives; DeadlineExceeded once the deadline has passed."""
        for chunk in self.response.iter_bytes():
            _check_deadline(self.url, self.deadline, self.max_seconds)
            yield chunk


def _check_deadline(url: httpx.URL, deadline: float | None, max_seconds: float | None) -> float:
    """Seconds left before the deadline (inf without one); DeadlineExceeded when none are."""
    if deadline is None:
        return float("inf")
    left = deadline - time.monotonic()
    if left <= 0:
        raise DeadlineExceeded(f"{redact(url)} took longer than {max_seconds:g} s")
    return left


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    return httpx.create_ssl_context(trust_env=True)


def _check_hop(
    url: httpx.URL,
    via: httpx.URL | None,
    allow_private: bool,
    resolver: Resolver | None,
    checker: Checker | None,
) -> list[IPAddress]:
    subject = redact(url) if via is None else f"{redact(via)} redirects to {redact(url)}, which"
    if url.scheme not in _SCHEMES or not url.host:
        raise Forbidden(f"{subject} is not an http:// or https:// URL with a host name")
    return resolve_public(
        url.raw_host.decode("ascii"),
        url.port or (443 if url.scheme == "https" else 80),
        allow_private=allow_private,
        resolver=resolver,
        checker=checker,
        subject=subject,
    )


def _pinned_request(
    client: httpx.Client,
    url: httpx.URL,
    address: IPAddress,
    timeout: float,
    headers: Mapping[str, str],
    body: bytes | None = None,
) -> httpx.Request:
    host = url.raw_host.decode("ascii")
    extensions = {"sni_hostname": host} if url.scheme == "https" else {}
    return client.build_request(
        "GET" if body is None else "POST",
        # The fragment is never sent; userinfo stays, for httpx's basic auth.
        url.copy_with(host=str(address), fragment=None),
        headers={
            **headers,
            "Host": url.netloc.decode("ascii"),
            "Accept-Encoding": "gzip, deflate",
        },
        content=body,
        timeout=timeout,
        extensions=extensions,
    )


def _send(
    client: httpx.Client,
    url: httpx.URL,
    addresses: list[IPAddress],
    timeout: float,
    headers: Mapping[str, str],
    body: bytes | None = None,
) -> tuple[httpx.Response, IPAddress]:
    """Send to the first of the (checked, non-empty) addresses that accepts a connection."""
    for address in addresses[:-1]:
        with contextlib.suppress(httpx.ConnectError):
            request = _pinned_request(client, url, address, timeout, headers, body)
            return client.send(request, stream=True), address
    request = _pinned_request(client, url, addresses[-1], timeout, headers, body)
    return client.send(request, stream=True), addresses[-1]


def _redirect_target(url: httpx.URL, response: httpx.Response) -> httpx.URL | None:
    location = response.headers.get("location")
    if response.status_code not in _REDIRECT_STATUSES or not location:
        return None
    try:
        return url.join(location).copy_with(fragment=None)
    except httpx.InvalidURL as exc:
        raise OutboundError(f"{redact(url)} redirects to an invalid URL ({exc})") from exc


def _check_encoding(url: httpx.URL, response: httpx.Response) -> None:
    encodings = response.headers.get_list("content-encoding", split_commas=True)
    unsupported = [e.strip() for e in encodings if e.strip().lower() not in _ENCODINGS]
    if unsupported:
        raise UnsupportedEncoding(
            f"{redact(url)} was sent with Content-Encoding {', '.join(unsupported)}; only gzip "
            "and deflate are accepted"
        )


@contextlib.contextmanager
def open_guarded(
    url: str,
    *,
    allow_private: bool,
    timeout: float,
    max_seconds: float | None = None,
    max_redirects: int = MAX_REDIRECTS,
    headers: Mapping[str, str] | None = None,
    resolver: Resolver | None = None,
    checker: Checker | None = None,
) -> Iterator[GuardedResponse]:
    """GET url with every defence in the module docstring; yields the final, streaming response.

    Read the body with GuardedResponse.iter_bytes, which enforces the deadline. timeout bounds
    each network step; max_seconds, if given, the whole exchange. resolver and checker replace
    resolve() and check_address() (tests). Raises OutboundError (or a subclass) for a refused or
    abandoned request, httpx.HTTPError for network failures, httpx.InvalidURL for a malformed url.
    """
    deadline = None if max_seconds is None else time.monotonic() + max_seconds
    current, via = httpx.URL(url), None
    for _hop in range(max_redirects + 1):
        addresses = _check_hop(current, via, allow_private, resolver, checker)
        step = min(timeout, _check_deadline(current, deadline, max_seconds))
        # A client per hop: a pooled TLS connection must never serve another host name.
        with (
            httpx.Client(follow_redirects=False, trust_env=False, verify=_ssl_context()) as client,
            contextlib.ExitStack() as stack,
        ):
            response, address = _send(client, current, addresses, step, headers or {})
            stack.callback(response.close)
            target = _redirect_target(current, response)
            if target is None:
                _check_encoding(current, response)
                yield GuardedResponse(current, address, response, deadline, max_seconds)
                return
        current, via = target, current
    raise TooManyRedirects(f"{redact(url)} redirected more than {max_redirects} times")


@dataclass(frozen=True)
class PostAnswer:
    status_code: int
    excerpt: str  # the start of the response body, for error messages


def post_guarded(
    url: str,
    body: bytes,
    *,
    allow_private: bool,
    timeout: float,
    headers: Mapping[str, str] | None = None,
    resolver: Resolver | None = None,
    checker: Checker | None = None,
) -> PostAnswer:
    """POST body to url with the same address checks and pinning as open_guarded. Redirects are
    not followed: a webhook receiver that redirects has answered, not accepted. Raises as
    open_guarded does."""
    current = httpx.URL(url)
    addresses = _check_hop(current, None, allow_private, resolver, checker)
    with httpx.Client(follow_redirects=False, trust_env=False, verify=_ssl_context()) as client:
        response, _address = _send(client, current, addresses, timeout, headers or {}, body)
        try:
            excerpt = b""
            for chunk in response.iter_bytes():
                excerpt += chunk
                if len(excerpt) >= 500:
                    break
        finally:
            response.close()
    return PostAnswer(response.status_code, excerpt[:500].decode("utf-8", "replace"))
