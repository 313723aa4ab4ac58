"""app.outbound and dataset fetching: only public addresses, pinned connections, bounded downloads.

Everything runs against servers on the loopback interface; host names are "resolved" by
monkeypatching socket.getaddrinfo or through open_guarded's resolver/checker hooks.
"""

from __future__ import annotations

import contextlib
import datetime
import gzip
import hashlib
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from app import outbound
from app.datasets.fetch import FetchedDataset, FetchError, fetch_dataset, validate_dataset_url

BODY = b'{"text": "hello"}\n' * 50
PRIVATE_ADVICE = (
    "dataset URLs must point at public hosts. Upload the file with POST /files, or ask the "
    "operator to set TUNESERVE_ALLOW_PRIVATE_NETWORKS=true."
)
LOOPBACK = ipaddress.ip_address("127.0.0.1")
# A second loopback address that tests treat as "public" (Linux answers on all of 127/8).
FAKE_PUBLIC = ipaddress.ip_address("127.0.0.2")


# --- a local HTTP server that records what it was sent -----------------------------------------

Responder = Callable[[BaseHTTPRequestHandler], None]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    routes: dict[str, Responder]
    seen: list[tuple[str, str | None]]


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.0: a body without Content-Length ends when the connection closes.
    protocol_version = "HTTP/1.0"
    server: _Server

    def do_GET(self) -> None:
        self.server.seen.append((self.path, self.headers.get("Host")))
        responder = self.server.routes.get(self.path, not_found)
        try:
            responder(self)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up on purpose

    def log_message(self, format: str, *args: object) -> None:
        pass


def send(
    handler: BaseHTTPRequestHandler,
    status: int,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> None:
    handler.send_response(status)
    for name, value in (headers or {}).items():
        handler.send_header(name, value)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def not_found(handler: BaseHTTPRequestHandler) -> None:
    send(handler, 404, b"nope")


def ok(body: bytes, headers: dict[str, str] | None = None) -> Responder:
    return lambda h: send(h, 200, body, headers)


def redirect(location: str) -> Responder:
    return lambda h: send(h, 302, headers={"Location": location})


def trickle(seconds: float, stall_first: bool = False) -> Responder:
    """200 without a length, then one byte every 50 ms (or nothing at all) for `seconds`."""

    def respond(handler: BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.end_headers()
        handler.wfile.flush()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(0.05)
            if not stall_first:
                handler.wfile.write(b" ")
                handler.wfile.flush()

    return respond


@dataclass
class Server:
    server: _Server
    scheme: str = "http"

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    @property
    def base(self) -> str:
        return f"{self.scheme}://{self.server.server_address[0]!s}:{self.port}"

    @property
    def seen(self) -> list[tuple[str, str | None]]:
        return self.server.seen

    def route(self, path: str, responder: Responder) -> str:
        self.server.routes[path] = responder
        return self.base + path


@contextlib.contextmanager
def serve(host: str = "127.0.0.1", tls: ssl.SSLContext | None = None) -> Iterator[Server]:
    try:
        server = _Server((host, 0), _Handler)
    except OSError as exc:
        pytest.skip(f"cannot listen on {host}: {exc}")
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    server.routes, server.seen = {}, []
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield Server(server, "https" if tls is not None else "http")
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def http() -> Iterator[Server]:
    with serve() as server:
        yield server


@pytest.fixture
def out(tmp_path: Path) -> Path:
    directory = tmp_path / "out"
    directory.mkdir()
    return directory


def fetch(url: str, dest: Path, **overrides: Any) -> FetchedDataset:
    kwargs: dict[str, Any] = {
        "allowed_file_dirs": [],
        "max_bytes": 1_000_000,
        "timeout_seconds": 5.0,
        "max_seconds": 30.0,
        "allow_private_networks": False,
    }
    kwargs.update(overrides)
    return fetch_dataset(url, dest, **kwargs)


def fetch_error(url: str, out: Path, **overrides: Any) -> FetchError:
    with pytest.raises(FetchError) as info:
        fetch(url, out / "ds", **overrides)
    assert list(out.iterdir()) == []  # nothing written, not even a partial file
    return info.value


GetAddrInfo = Callable[..., list[tuple[Any, ...]]]


def fake_dns(monkeypatch: pytest.MonkeyPatch, names: dict[str, list[str]]) -> list[str]:
    """Resolve the given names to the given addresses (others as usual); returns the names
    looked up, in order."""
    real: GetAddrInfo = socket.getaddrinfo
    looked_up: list[str] = []

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
        looked_up.append(str(host))
        if host not in names:
            return real(host, port, *args, **kwargs)
        return [
            (
                socket.AF_INET6 if ":" in a else socket.AF_INET,
                socket.SOCK_STREAM,
                socket.IPPROTO_TCP,
                "",
                (a, int(port)),
            )
            for a in names[host]
        ]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return looked_up


# --- address classification ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "a loopback address"),
        ("127.255.0.9", "a loopback address"),
        ("10.0.0.1", "a private address"),
        ("172.16.5.4", "a private address"),
        ("192.168.1.1", "a private address"),
        ("169.254.169.254", "a link-local address (cloud metadata)"),
        ("169.254.1.1", "a link-local address"),
        ("100.64.0.1", "a shared (carrier-grade NAT) address"),
        ("0.0.0.0", "an unspecified address"),
        ("0.1.2.3", "an unspecified ('this network') address"),
        ("224.0.0.1", "a multicast address"),
        ("239.255.255.250", "a multicast address"),
        ("255.255.255.255", "a broadcast address"),
        ("240.0.0.1", "a reserved address"),
        ("192.0.2.1", "a documentation address"),
        ("198.51.100.7", "a documentation address"),
        ("203.0.113.9", "a documentation address"),
        ("198.18.0.1", "a benchmarking address"),
        ("192.0.0.8", "an IETF protocol-assignment address"),
        ("::1", "a loopback address"),
        ("::", "an unspecified address"),
        ("fe80::1", "a link-local address"),
        ("fc00::1", "a unique-local address"),
        ("fd00:ec2::254", "a unique-local address (cloud metadata)"),
        ("fec0::1", "a site-local address"),
        ("ff02::1", "a multicast address"),
        ("2001:db8::1", "a documentation address"),
        ("::ffff:127.0.0.1", "an IPv4-mapped address embedding 127.0.0.1, a loopback address"),
        (
            "::ffff:169.254.169.254",
            "an IPv4-mapped address embedding 169.254.169.254, a link-local address "
            "(cloud metadata)",
        ),
        ("::ffff:10.1.2.3", "an IPv4-mapped address embedding 10.1.2.3, a private address"),
        ("64:ff9b::7f00:1", "a NAT64 address embedding 127.0.0.1, a loopback address"),
        ("64:ff9b::a9fe:a9fe", "a NAT64 address embedding 169.254.169.254"),
        ("2002:7f00:1::", "a 6to4 address embedding 127.0.0.1, a loopback address"),
        ("2002:c0a8:101::1", "a 6to4 address embedding 192.168.1.1, a private address"),
        ("::7f00:1", "an IPv4-compatible address (deprecated)"),
        ("::808:808", "an IPv4-compatible address (deprecated)"),
        ("64:ff9b:1::1", "a local-use NAT64 address"),
        ("2001::1", "an IETF protocol-assignment address"),  # Teredo
    ],
)
def test_non_public_addresses_are_refused(address: str, reason: str) -> None:
    found = outbound.check_address(ipaddress.ip_address(address))
    assert found is not None
    assert found.startswith(reason)


@pytest.mark.parametrize(
    "address",
    [
        "8.8.8.8",
        "1.1.1.1",
        "93.184.216.34",
        "2606:4700::1111",
        "2a00:1450:4001:81c::200e",
        "::ffff:8.8.8.8",  # IPv4-mapped: judged by the IPv4 address it reaches
        "64:ff9b::808:808",  # NAT64 of 8.8.8.8 (IPv6-only hosts reach the internet this way)
        "2002:808:808::1",  # 6to4 of 8.8.8.8
    ],
)
def test_public_addresses_are_allowed(address: str) -> None:
    assert outbound.check_address(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("0x7f.0.0.1", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("[::1]", "::1"),
        ("::ffff:7f00:1", "::ffff:7f00:1"),
        ("example.com", None),
        ("cafe.example", None),
        ("deadbeef", None),
    ],
)
def test_literal_address_parses_every_numeric_spelling(host: str, expected: str | None) -> None:
    found = outbound.literal_address(host)
    assert (None if found is None else str(found)) == expected


def test_resolve_public_checks_every_address(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_dns(monkeypatch, {"mixed.example": ["8.8.8.8", "10.0.0.5"]})
    with pytest.raises(outbound.Forbidden) as info:
        outbound.resolve_public("mixed.example", 443, allow_private=False)
    assert str(info.value) == "mixed.example resolves to 10.0.0.5, a private address"
    assert (str(info.value.address), info.value.reason) == ("10.0.0.5", "a private address")
    addresses = outbound.resolve_public("mixed.example", 443, allow_private=True)
    assert [str(a) for a in addresses] == ["8.8.8.8", "10.0.0.5"]


def test_resolve_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", fail)
    with pytest.raises(outbound.Unresolvable) as info:
        outbound.resolve("nowhere.example", 80)
    assert str(info.value) == (
        "the host name nowhere.example could not be resolved (Name or service not known)"
    )


# --- fetch_dataset refuses non-public hosts ------------------------------------------------------


def test_fetch_refuses_loopback_literal(http: Server, out: Path) -> None:
    url = http.route("/x", ok(BODY))
    error = fetch_error(url, out)
    assert error.code == "dataset_url_forbidden"
    assert error.message == (f"{url} resolves to 127.0.0.1, a loopback address; {PRIVATE_ADVICE}")
    assert http.seen == []  # refused before connecting


@pytest.mark.parametrize(
    ("url", "address", "reason"),
    [
        ("http://[::1]:{port}/", "::1", "a loopback address"),
        ("http://2130706433:{port}/x", "127.0.0.1", "a loopback address"),
        ("http://0x7f.0.0.1:{port}/x", "127.0.0.1", "a loopback address"),
        ("http://localhost:{port}/x", "", "a loopback address"),
        ("http://[::ffff:127.0.0.1]:{port}/x", "::ffff:127.0.0.1", "an IPv4-mapped address"),
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254", "(cloud metadata)"),
        ("http://0.0.0.0:{port}/x", "0.0.0.0", "an unspecified address"),
    ],
)
def test_fetch_refuses_other_spellings_of_internal_hosts(
    http: Server, out: Path, url: str, address: str, reason: str
) -> None:
    error = fetch_error(url.format(port=http.port), out)
    assert error.code == "dataset_url_forbidden"
    assert f"resolves to {address}" in error.message
    assert reason in error.message
    assert error.message.endswith(PRIVATE_ADVICE)
    assert http.seen == []


def test_fetch_refuses_octal_ip_as_invalid(http: Server, out: Path) -> None:
    # httpx itself rejects the leading-zero spelling; submission refuses it as forbidden.
    error = fetch_error(f"http://0177.0.0.1:{http.port}/x", out)
    assert error.code == "dataset_url_invalid"
    assert http.seen == []


def test_fetch_refuses_name_resolving_to_loopback(
    http: Server, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_dns(monkeypatch, {"evil.example": ["127.0.0.1"]})
    error = fetch_error(f"http://evil.example:{http.port}/t.jsonl?token=SECRET", out)
    assert error.code == "dataset_url_forbidden"
    assert error.message == (
        f"http://evil.example:{http.port}/t.jsonl resolves to 127.0.0.1, a loopback address; "
        f"{PRIVATE_ADVICE}"
    )
    assert http.seen == []


def test_fetch_refuses_name_with_one_private_address(
    out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_dns(monkeypatch, {"split.example": ["93.184.216.34", "192.168.0.10"]})
    error = fetch_error("https://split.example/t.jsonl", out)
    assert error.code == "dataset_url_forbidden"
    assert "resolves to 192.168.0.10, a private address" in error.message


def test_fetch_dns_failure(out: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", fail)
    error = fetch_error("https://nowhere.example/t.jsonl", out)
    assert error.code == "dataset_fetch_failed"
    assert error.message.startswith(
        "Downloading https://nowhere.example/t.jsonl failed: the host name nowhere.example could "
        "not be resolved (Name or service not known)."
    )


# --- redirects -----------------------------------------------------------------------------------


@pytest.fixture
def public() -> Iterator[Server]:
    """A server on 127.0.0.2, which the tests below treat as a public address."""
    with serve(str(FAKE_PUBLIC)) as server:
        yield server


def treat_fake_public_as_public(monkeypatch: pytest.MonkeyPatch) -> None:
    real = outbound.check_address
    monkeypatch.setattr(
        outbound, "check_address", lambda ip: None if ip == FAKE_PUBLIC else real(ip)
    )


def test_fetch_from_public_server_works(
    public: Server, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    treat_fake_public_as_public(monkeypatch)
    url = public.route("/data/train.jsonl", ok(BODY))
    assert fetch(url, out / "ds").bytes == len(BODY)


@pytest.mark.parametrize(
    ("location", "shown", "reason"),
    [
        ("http://127.0.0.1:{port}/secret", "http://127.0.0.1:{port}/secret", "a loopback address"),
        ("http://localhost:{port}/secret", "http://localhost:{port}/secret", "a loopback address"),
        ("http://[::1]:{port}/secret", "http://[::1]:{port}/secret", "a loopback address"),
        (
            "http://u:PASSWORD@169.254.169.254/latest/meta-data/?t=SECRET",
            "http://169.254.169.254/latest/meta-data/",
            "169.254.169.254, a link-local address (cloud metadata)",
        ),
    ],
)
def test_redirect_into_internal_network_is_refused(
    public: Server,
    http: Server,
    out: Path,
    monkeypatch: pytest.MonkeyPatch,
    location: str,
    shown: str,
    reason: str,
) -> None:
    treat_fake_public_as_public(monkeypatch)
    http.route("/secret", ok(b"internal"))
    url = public.route("/r", redirect(location.format(port=http.port)))
    error = fetch_error(url, out)
    assert error.code == "dataset_url_forbidden"
    assert error.message.startswith(
        f"{url} redirects to {shown.format(port=http.port)}, which resolves to "
    )
    assert reason in error.message
    assert error.message.endswith(PRIVATE_ADVICE)
    assert "PASSWORD" not in error.message
    assert "SECRET" not in error.message
    assert http.seen == []


def test_relative_redirect_is_rechecked(
    public: Server, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The same host again (resolved again), then a relative hop: both fine.
    treat_fake_public_as_public(monkeypatch)
    public.route("/final.jsonl", ok(BODY))
    public.route("/b/hop", redirect("../final.jsonl"))
    url = public.route("/a", redirect(public.base + "/b/hop"))
    result = fetch(url, out / "ds")
    assert (result.filename, result.bytes) == ("final.jsonl", len(BODY))
    assert [path for path, _ in public.seen] == ["/a", "/b/hop", "/final.jsonl"]


@pytest.mark.parametrize("location", ["file:///etc/passwd", "ftp://example.com/t.jsonl"])
def test_redirect_to_other_scheme_is_refused(
    public: Server, out: Path, monkeypatch: pytest.MonkeyPatch, location: str
) -> None:
    treat_fake_public_as_public(monkeypatch)
    url = public.route("/r", redirect(location))
    error = fetch_error(url, out)
    assert error.code == "dataset_url_forbidden"
    assert error.message == (
        f"{url} redirects to {location}, which is not an http:// or https:// URL with a host "
        "name; upload the file with POST /files."
    )


def test_redirect_refusal_through_open_guarded_hooks(public: Server, http: Server) -> None:
    # The same scenario without monkeypatching: inject the resolver and the checker.
    def resolver(host: str, port: int) -> list[outbound.IPAddress]:
        return [FAKE_PUBLIC] if host == "public.example" else outbound.resolve(host, port)

    def checker(ip: outbound.IPAddress) -> str | None:
        return None if ip == FAKE_PUBLIC else outbound.check_address(ip)

    public.route("/r", redirect(f"http://127.0.0.1:{http.port}/secret"))
    url = f"http://public.example:{public.port}/r"
    with (
        pytest.raises(outbound.Forbidden) as info,
        outbound.open_guarded(
            url, allow_private=False, timeout=5, resolver=resolver, checker=checker
        ),
    ):
        pass
    assert str(info.value) == (
        f"{url} redirects to http://127.0.0.1:{http.port}/secret, which resolves to "
        "127.0.0.1, a loopback address"
    )
    assert public.seen == [("/r", f"public.example:{public.port}")]


def test_too_many_redirects(http: Server, out: Path) -> None:
    url = http.route("/loop", redirect("/loop"))
    error = fetch_error(url, out, allow_private_networks=True)
    assert error.code == "dataset_fetch_failed"
    assert "more than 5 redirects" in error.message
    assert len(http.seen) == 6


# --- pinning -------------------------------------------------------------------------------------


def test_connection_is_pinned_to_the_checked_address(
    http: Server, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    looked_up = fake_dns(monkeypatch, {"dataset.example": ["127.0.0.1"]})
    http.route("/t.jsonl", ok(BODY, {"ETag": '"v1"'}))
    url = f"http://dataset.example:{http.port}/t.jsonl"
    result = fetch(url, out / "ds", allow_private_networks=True)
    assert result == FetchedDataset(
        path=out / "ds",
        filename="t.jsonl",
        bytes=len(BODY),
        sha256=hashlib.sha256(BODY).hexdigest(),
        etag='"v1"',
    )
    assert (out / "ds").read_bytes() == BODY
    # The server saw the original Host header, and the name was looked up exactly once: the
    # connection went to the address that was checked, not to a second DNS answer.
    assert http.seen == [("/t.jsonl", f"dataset.example:{http.port}")]
    assert looked_up.count("dataset.example") == 1


def test_next_address_is_tried_when_one_refuses_connections(
    http: Server, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Nothing listens on 127.0.0.3 (connection refused); the second address answers.
    fake_dns(monkeypatch, {"two.example": ["127.0.0.3", "127.0.0.1"]})
    http.route("/t.jsonl", ok(BODY))
    url = f"http://two.example:{http.port}/t.jsonl"
    assert fetch(url, out / "ds", allow_private_networks=True).bytes == len(BODY)
    assert http.seen == [("/t.jsonl", f"two.example:{http.port}")]


def test_pinned_request_shape() -> None:
    url = httpx.URL("https://user:pw@dataset.example:8443/a/t.jsonl?sig=1#frag")
    with httpx.Client() as client:
        request = outbound._pinned_request(
            client, url, ipaddress.ip_address("2606:4700::1111"), 5.0, {}
        )
    assert str(request.url) == "https://user:pw@[2606:4700::1111]:8443/a/t.jsonl?sig=1"
    assert request.headers["Host"] == "dataset.example:8443"
    assert request.headers["Accept-Encoding"] == "gzip, deflate"
    assert request.extensions["sni_hostname"] == "dataset.example"


def _self_signed(tmp_path: Path, name: str) -> tuple[Path, Path]:
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_https_uses_host_name_for_sni_and_certificate(
    tmp_path: Path, out: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = _self_signed(tmp_path, "dataset.example")
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)
    sni: list[str | None] = []
    server_tls.sni_callback = lambda sock, name, ctx: sni.append(name)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    outbound._ssl_context.cache_clear()
    try:
        with serve(tls=server_tls) as https:
            https.route("/t.jsonl", ok(BODY))
            fake_dns(monkeypatch, {"dataset.example": ["127.0.0.1"]})
            url = f"https://dataset.example:{https.port}/t.jsonl"
            assert fetch(url, out / "ds", allow_private_networks=True).bytes == len(BODY)
            # The certificate names dataset.example, not 127.0.0.1: verification used the name.
            assert sni == ["dataset.example"]
            assert https.seen == [("/t.jsonl", f"dataset.example:{https.port}")]
    finally:
        outbound._ssl_context.cache_clear()


# --- bounds --------------------------------------------------------------------------------------


def test_local_server_allowed_when_private_networks_are(http: Server, out: Path) -> None:
    url = http.route("/data/my%20train.jsonl", ok(BODY))
    result = fetch(url, out / "ds", allow_private_networks=True)
    assert (result.filename, result.bytes) == ("my train.jsonl", len(BODY))
    assert result.sha256 == hashlib.sha256(BODY).hexdigest()


def test_total_deadline_while_streaming(http: Server, out: Path) -> None:
    url = http.route("/slow.jsonl", trickle(seconds=5))
    started = time.monotonic()
    error = fetch_error(url, out, allow_private_networks=True, max_seconds=1)
    assert time.monotonic() - started < 3
    assert error.code == "dataset_fetch_failed"
    assert error.message.startswith(f"Downloading {url} failed: it took longer than 1 s.")
    assert "TUNESERVE_FETCH_MAX_SECONDS" in error.message


def test_total_deadline_cuts_a_stalled_read_short(http: Server, out: Path) -> None:
    url = http.route("/stalled.jsonl", trickle(seconds=5, stall_first=True))
    started = time.monotonic()
    error = fetch_error(url, out, allow_private_networks=True, max_seconds=1, timeout_seconds=30)
    assert time.monotonic() - started < 3
    assert error.code == "dataset_fetch_failed"
    assert "took longer than 1 s" in error.message


def test_content_encoding_cannot_bypass_the_byte_cap(http: Server, out: Path) -> None:
    bomb = gzip.compress(b"\0" * 5_000_000)
    url = http.route("/t.jsonl", ok(bomb, {"Content-Encoding": "gzip"}))
    error = fetch_error(url, out, allow_private_networks=True, max_bytes=1_000_000)
    assert error.code == "dataset_too_large"
    assert len(bomb) < 1_000_000  # the cap was hit by what was decoded, not what was sent


def test_unbounded_content_encodings_are_refused(http: Server, out: Path) -> None:
    url = http.route("/t.jsonl", ok(b"\x0b\x02\x80hello\x03", {"Content-Encoding": "br"}))
    error = fetch_error(url, out, allow_private_networks=True)
    assert error.code == "dataset_fetch_failed"
    assert "Content-Encoding br; only gzip and deflate are accepted" in error.message


# --- validate_dataset_url (submission time, no DNS) ----------------------------------------------

INTERNAL_URLS = [
    "http://127.0.0.1/x",
    "http://[::1]/x",
    "http://169.254.169.254/latest/meta-data",
    "http://localhost/x",
    "http://LOCALHOST./x",
    "http://api.localhost:8000/x",
    "http://10.1.2.3:8080/x",
    "http://2130706433/x",
    "http://0x7f.0.0.1/x",
    "http://0177.0.0.1/x",
    "http://[::ffff:127.0.0.1]/x",
    "https://[fd00::1]/x",
]


@pytest.fixture
def no_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
        raise AssertionError("validate_dataset_url must not look names up")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.mark.usefixtures("no_dns")
@pytest.mark.parametrize("url", INTERNAL_URLS)
def test_validate_refuses_internal_hosts(url: str) -> None:
    with pytest.raises(FetchError) as info:
        validate_dataset_url(url, allow_private_networks=False)
    assert info.value.code == "dataset_url_forbidden"
    assert info.value.message.endswith(PRIVATE_ADVICE)


@pytest.mark.usefixtures("no_dns")
@pytest.mark.parametrize(
    ("url", "message"),
    [
        (
            "http://u:PW@169.254.169.254/latest/meta-data?x=SECRET",
            "http://169.254.169.254/latest/meta-data resolves to 169.254.169.254, a link-local "
            "address (cloud metadata)",
        ),
        (
            "http://[::ffff:127.0.0.1]:8080/x",
            "http://[::ffff:127.0.0.1]:8080/x resolves to ::ffff:127.0.0.1, an IPv4-mapped address "
            "embedding 127.0.0.1, a loopback address",
        ),
        ("http://LocalHost./x", "http://localhost./x points at localhost, a loopback host name"),
    ],
)
def test_validate_refusal_message(url: str, message: str) -> None:
    with pytest.raises(FetchError) as info:
        validate_dataset_url(url)
    assert info.value.message == f"{message}; {PRIVATE_ADVICE}"


@pytest.mark.usefixtures("no_dns")
@pytest.mark.parametrize("url", INTERNAL_URLS)
def test_validate_accepts_internal_hosts_when_allowed(url: str) -> None:
    validate_dataset_url(url, allow_private_networks=True)


@pytest.mark.usefixtures("no_dns")
@pytest.mark.parametrize(
    "url",
    ["https://example.com/x", "http://8.8.8.8/t.jsonl", "https://[2606:4700::1111]/t.jsonl"],
)
def test_validate_accepts_public_hosts_without_dns(url: str) -> None:
    validate_dataset_url(url)
    validate_dataset_url(url, allow_private_networks=False)
