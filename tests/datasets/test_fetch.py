from __future__ import annotations

import gzip
import hashlib
import pickle
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from app.datasets.fetch import FetchedDataset, FetchError, fetch_dataset, validate_dataset_url

# --- a real local HTTP server -------------------------------------------------------------------


@dataclass
class Route:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    send_length: bool = True
    delay: float = 0.0


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    routes: dict[str, Route]


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.0: a response without Content-Length is delimited by closing the connection.
    protocol_version = "HTTP/1.0"
    server: _Server

    def do_GET(self) -> None:
        route = self.server.routes.get(self.path, Route(status=404, body=b"nope"))
        if route.delay:
            time.sleep(route.delay)
        try:
            self.send_response(route.status)
            for name, value in route.headers.items():
                self.send_header(name, value)
            if route.send_length and "Content-Length" not in route.headers:
                self.send_header("Content-Length", str(len(route.body)))
            self.end_headers()
            self.wfile.write(route.body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up early on purpose (size limits)

    def log_message(self, format: str, *args: object) -> None:
        pass


@dataclass
class HttpServer:
    server: _Server

    @property
    def base(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}"

    def route(self, path: str, route: Route) -> str:
        self.server.routes[path] = route
        return self.base + path


@pytest.fixture
def http() -> Iterator[HttpServer]:
    server = _Server(("127.0.0.1", 0), _Handler)
    server.routes = {}
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield HttpServer(server)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def out(tmp_path: Path) -> Path:
    directory = tmp_path / "out"
    directory.mkdir()
    return directory


def fetch(url: str, dest: Path, **overrides: object) -> FetchedDataset:
    kwargs: dict[str, object] = {
        "allowed_file_dirs": [],
        "max_bytes": 1_000_000,
        "timeout_seconds": 5.0,
        "max_seconds": 30.0,
        # These tests serve datasets from loopback; tests/unit/test_outbound.py covers refusal.
        "allow_private_networks": True,
    }
    kwargs.update(overrides)
    return fetch_dataset(url, dest, **kwargs)  # type: ignore[arg-type]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def assert_nothing_written(out: Path) -> None:
    assert list(out.iterdir()) == []


BODY = b'{"text": "hello"}\n' * 100


# --- http(s) -----------------------------------------------------------------------------------


def test_http_ok_with_etag(http: HttpServer, out: Path) -> None:
    url = http.route("/data/train.jsonl", Route(body=BODY, headers={"ETag": '"v1-abc"'}))
    dest = out / "ds"
    result = fetch(url, dest)
    assert result == FetchedDataset(
        path=dest, filename="train.jsonl", bytes=len(BODY), sha256=sha(BODY), etag='"v1-abc"'
    )
    assert dest.read_bytes() == BODY
    assert [p.name for p in out.iterdir()] == ["ds"]


def test_http_without_length_or_etag(http: HttpServer, out: Path) -> None:
    url = http.route("/t.csv", Route(body=b"text\nhi\n", send_length=False))
    result = fetch(url, out / "ds")
    assert (result.bytes, result.sha256, result.etag) == (8, sha(b"text\nhi\n"), None)


def test_http_root_path_filename_defaults(http: HttpServer, out: Path) -> None:
    http.route("/", Route(body=BODY))
    result = fetch(http.base + "/", out / "ds")
    assert result.filename == "dataset"


def test_http_overwrites_existing_dest(http: HttpServer, out: Path) -> None:
    dest = out / "ds"
    dest.write_bytes(b"old")
    fetch(http.route("/t.jsonl", Route(body=BODY)), dest)
    assert dest.read_bytes() == BODY


def test_http_redirect_followed(http: HttpServer, out: Path) -> None:
    final = http.route("/files/my%20train.jsonl", Route(body=BODY, headers={"ETag": "e"}))
    http.route("/r2", Route(status=301, headers={"Location": final}))
    url = http.route("/r1", Route(status=302, headers={"Location": "/r2"}))
    result = fetch(url, out / "ds")
    assert result.filename == "my train.jsonl"
    assert result.etag == "e"
    assert (out / "ds").read_bytes() == BODY


def test_http_too_many_redirects(http: HttpServer, out: Path) -> None:
    url = http.route("/loop", Route(status=302, headers={"Location": "/loop"}))
    with pytest.raises(FetchError) as info:
        fetch(url, out / "ds")
    assert info.value.code == "dataset_fetch_failed"
    assert "more than 5 redirects" in info.value.message
    assert_nothing_written(out)


@pytest.mark.parametrize("status", [404, 410])
def test_http_not_found(http: HttpServer, out: Path, status: int) -> None:
    url = http.route("/gone.jsonl", Route(status=status, body=b"gone"))
    with pytest.raises(FetchError) as info:
        fetch(url, out / "ds")
    assert info.value.code == "dataset_not_found"
    assert f"returned HTTP {status}" in str(info.value)
    assert_nothing_written(out)


@pytest.mark.parametrize(("status", "text"), [(500, "HTTP 500"), (403, "credentials")])
def test_http_error_status(http: HttpServer, out: Path, status: int, text: str) -> None:
    url = http.route("/t.jsonl", Route(status=status, body=b"boom"))
    with pytest.raises(FetchError) as info:
        fetch(url, out / "ds")
    assert info.value.code == "dataset_fetch_failed"
    assert text in info.value.message
    assert_nothing_written(out)


def test_http_error_message_hides_query_and_credentials(http: HttpServer, out: Path) -> None:
    http.route("/t.jsonl?sig=SECRET", Route(status=404))
    url = http.base.replace("http://", "http://user:PASSWORD@") + "/t.jsonl?sig=SECRET"
    with pytest.raises(FetchError) as info:
        fetch(url, out / "ds")
    assert info.value.code == "dataset_not_found"
    assert "SECRET" not in info.value.message
    assert "PASSWORD" not in info.value.message
    assert f"{http.base}/t.jsonl returned HTTP 404" in info.value.message


def test_http_too_large_by_content_length(http: HttpServer, out: Path) -> None:
    url = http.route("/big.jsonl", Route(body=b"x" * 5000))
    with pytest.raises(FetchError) as info:
        fetch(url, out / "ds", max_bytes=1000)
    assert info.value.code == "dataset_too_large"
    assert "(5000 bytes)" in info.value.message
    assert "1000-byte limit" in info.value.message
    assert_nothing_written(out)


def test_http_too_large_while_streaming(http: HttpServer, out: Path) -> None:
    url = http.route("/big.jsonl", Route(body=b"x" * 5000, send_length=False))
    with pytest.raises(FetchError) as info:
        fetch(url, out / "ds", max_bytes=1000)
    assert info.value.code == "dataset_too_large"
    assert_nothing_written(out)


def test_http_exactly_max_bytes_is_fine(http: HttpServer, out: Path) -> None:
    url = http.route("/ok.jsonl", Route(body=b"x" * 1000, send_length=False))
    assert fetch(url, out / "ds", max_bytes=1000).bytes == 1000


def test_http_content_encoding_is_decoded(http: HttpServer, out: Path) -> None:
    headers = {"Content-Encoding": "gzip"}
    url = http.route("/t.jsonl.gz", Route(body=gzip.compress(BODY), headers=headers))
    result = fetch(url, out / "ds")
    assert (out / "ds").read_bytes() == BODY
    assert (result.filename, result.bytes, result.sha256) == ("t.jsonl.gz", len(BODY), sha(BODY))


def test_http_timeout(http: HttpServer, out: Path) -> None:
    url = http.route("/slow.jsonl", Route(body=BODY, delay=1.0))
    with pytest.raises(FetchError) as info:
        fetch(url, out / "ds", timeout_seconds=0.2)
    assert info.value.code == "dataset_fetch_failed"
    assert "no response within 0.2 seconds" in info.value.message
    assert_nothing_written(out)


def test_http_connection_refused(out: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(FetchError) as info:
        fetch(f"http://127.0.0.1:{port}/t.jsonl", out / "ds")
    assert info.value.code == "dataset_fetch_failed"
    assert f"http://127.0.0.1:{port}/t.jsonl failed" in info.value.message
    assert "reachable" in info.value.message
    assert_nothing_written(out)


# --- file:// -----------------------------------------------------------------------------------


@pytest.fixture
def allowed(tmp_path: Path) -> Path:
    directory = tmp_path / "allowed"
    directory.mkdir()
    return directory


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    directory = tmp_path / "outside"
    directory.mkdir()
    return directory


def test_file_ok(allowed: Path, out: Path) -> None:
    (allowed / "sub").mkdir()
    source = allowed / "sub" / "my train.jsonl"
    source.write_bytes(BODY)
    dest = out / "ds"
    url = "file://" + str(source).replace(" ", "%20")
    result = fetch(url, dest, allowed_file_dirs=[allowed])
    assert result == FetchedDataset(
        path=dest, filename="my train.jsonl", bytes=len(BODY), sha256=sha(BODY), etag=None
    )
    assert dest.read_bytes() == BODY
    assert source.read_bytes() == BODY


def test_file_localhost_host_accepted(allowed: Path, out: Path) -> None:
    (allowed / "t.jsonl").write_bytes(BODY)
    result = fetch(f"file://localhost{allowed}/t.jsonl", out / "ds", allowed_file_dirs=[allowed])
    assert result.bytes == len(BODY)


def test_file_symlink_inside_allowed_dir_keeps_link_name(allowed: Path, out: Path) -> None:
    (allowed / "blobs").mkdir()
    (allowed / "blobs" / "9f8e7d").write_bytes(BODY)
    (allowed / "train.jsonl").symlink_to(allowed / "blobs" / "9f8e7d")
    result = fetch(f"file://{allowed}/train.jsonl", out / "ds", allowed_file_dirs=[allowed])
    assert (result.filename, result.sha256) == ("train.jsonl", sha(BODY))


def test_file_allowed_dir_given_through_symlink(tmp_path: Path, allowed: Path, out: Path) -> None:
    (allowed / "t.jsonl").write_bytes(BODY)
    alias = tmp_path / "alias"
    alias.symlink_to(allowed)
    result = fetch(f"file://{alias}/t.jsonl", out / "ds", allowed_file_dirs=[alias])
    assert result.sha256 == sha(BODY)


def test_file_outside_allowed_dirs(allowed: Path, outside: Path, out: Path) -> None:
    (outside / "t.jsonl").write_bytes(BODY)
    with pytest.raises(FetchError) as info:
        fetch(f"file://{outside}/t.jsonl", out / "ds", allowed_file_dirs=[allowed, out])
    assert info.value.code == "dataset_url_forbidden"
    assert info.value.message == (
        f"{outside}/t.jsonl is not under an allowed directory; allowed: {allowed}, {out}. "
        "Upload the file with POST /files or ask the operator to add its directory to "
        "TUNESERVE_ALLOWED_FILE_DIRS."
    )
    assert_nothing_written(out)


def test_file_no_allowed_dirs(allowed: Path, out: Path) -> None:
    (allowed / "t.jsonl").write_bytes(BODY)
    with pytest.raises(FetchError) as info:
        fetch(f"file://{allowed}/t.jsonl", out / "ds", allowed_file_dirs=[])
    assert info.value.code == "dataset_url_forbidden"
    assert "file:// URLs are disabled" in info.value.message


def test_file_symlink_escaping_allowed_dir(allowed: Path, outside: Path, out: Path) -> None:
    (outside / "secret.jsonl").write_bytes(BODY)
    (allowed / "t.jsonl").symlink_to(outside / "secret.jsonl")
    with pytest.raises(FetchError) as info:
        fetch(f"file://{allowed}/t.jsonl", out / "ds", allowed_file_dirs=[allowed])
    assert info.value.code == "dataset_url_forbidden"
    assert_nothing_written(out)


def test_file_dotdot_escaping_allowed_dir(allowed: Path, outside: Path, out: Path) -> None:
    (outside / "t.jsonl").write_bytes(BODY)
    with pytest.raises(FetchError) as info:
        fetch(f"file://{allowed}/../outside/t.jsonl", out / "ds", allowed_file_dirs=[allowed])
    assert info.value.code == "dataset_url_forbidden"


def test_file_sibling_with_common_prefix_is_outside(
    tmp_path: Path, allowed: Path, out: Path
) -> None:
    sibling = tmp_path / "allowed-not"
    sibling.mkdir()
    (sibling / "t.jsonl").write_bytes(BODY)
    with pytest.raises(FetchError) as info:
        fetch(f"file://{sibling}/t.jsonl", out / "ds", allowed_file_dirs=[allowed])
    assert info.value.code == "dataset_url_forbidden"


def test_file_missing(allowed: Path, out: Path) -> None:
    with pytest.raises(FetchError) as info:
        fetch(f"file://{allowed}/nope.jsonl", out / "ds", allowed_file_dirs=[allowed])
    assert info.value.code == "dataset_not_found"
    assert f"{allowed}/nope.jsonl does not exist" in info.value.message


def test_file_missing_outside_is_forbidden_not_not_found(outside: Path, allowed: Path) -> None:
    # Must not reveal whether paths outside the allowed directories exist.
    with pytest.raises(FetchError) as info:
        fetch(f"file://{outside}/nope.jsonl", allowed / "ds", allowed_file_dirs=[allowed])
    assert info.value.code == "dataset_url_forbidden"


def test_file_dangling_symlink_is_not_found(allowed: Path, out: Path) -> None:
    (allowed / "t.jsonl").symlink_to(allowed / "gone.jsonl")
    with pytest.raises(FetchError) as info:
        fetch(f"file://{allowed}/t.jsonl", out / "ds", allowed_file_dirs=[allowed])
    assert info.value.code == "dataset_not_found"


def test_file_directory(allowed: Path, out: Path) -> None:
    (allowed / "d").mkdir()
    with pytest.raises(FetchError) as info:
        fetch(f"file://{allowed}/d", out / "ds", allowed_file_dirs=[allowed])
    assert info.value.code == "dataset_url_invalid"
    assert "is a directory" in info.value.message


def test_file_too_large(allowed: Path, out: Path) -> None:
    (allowed / "t.jsonl").write_bytes(b"x" * 101)
    with pytest.raises(FetchError) as info:
        fetch(f"file://{allowed}/t.jsonl", out / "ds", allowed_file_dirs=[allowed], max_bytes=100)
    assert info.value.code == "dataset_too_large"
    assert "(101 bytes)" in info.value.message
    assert_nothing_written(out)


# --- URL syntax --------------------------------------------------------------------------------

BAD_URLS = [
    "",
    "   ",
    " https://example.com/t.jsonl",
    "https://example.com/t\n.jsonl",
    "ftp://example.com/t.jsonl",
    "s3://bucket/t.jsonl",
    "hf://datasets/org/name",
    "gs://bucket/t.jsonl",
    "relative/path.jsonl",
    "/absolute/but/no/scheme.jsonl",
    "http://",
    "https:///t.jsonl",
    "http://example.com:99999/t.jsonl",
    "file://data/train.jsonl",
    "file:relative.jsonl",
    "file-",
    "file-abc/../etc",
]


@pytest.mark.parametrize("url", BAD_URLS)
def test_validate_rejects(url: str) -> None:
    with pytest.raises(FetchError) as info:
        validate_dataset_url(url)
    assert info.value.code == "dataset_url_invalid"
    assert info.value.message.endswith(
        "Use an uploaded file id (file-…), an http(s):// URL, or a file:// path under an "
        "allowed directory."
    )


@pytest.mark.parametrize("url", [*BAD_URLS, "file-abc123"])
def test_fetch_rejects_invalid_urls(url: str, tmp_path: Path, out: Path) -> None:
    with pytest.raises(FetchError) as info:
        fetch(url, out / "ds", allowed_file_dirs=[tmp_path])
    assert info.value.code == "dataset_url_invalid"
    assert_nothing_written(out)


@pytest.mark.parametrize(
    "url",
    [
        "file-abc123",
        "file-2024_01-XYZ",
        "https://example.com/data/train.jsonl?download=1",
        "HTTPS://Example.com/t.jsonl",
        "file:///data/train.jsonl",
        "file://localhost/data/train.jsonl",
        "file:///data/my%20train.jsonl",
    ],
)
def test_validate_accepts(url: str) -> None:
    validate_dataset_url(url)


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000/t.jsonl", "http://[::1]:8000/t.jsonl"])
def test_validate_accepts_loopback_only_when_private_networks_are_allowed(url: str) -> None:
    validate_dataset_url(url, allow_private_networks=True)
    with pytest.raises(FetchError) as info:
        validate_dataset_url(url)
    assert info.value.code == "dataset_url_forbidden"


def test_file_scheme_error_hints_three_slashes() -> None:
    with pytest.raises(FetchError) as info:
        validate_dataset_url("file://data/train.jsonl")
    assert "file:///data/train.jsonl" in info.value.message


def test_fetch_error_survives_pickling() -> None:
    clone = pickle.loads(pickle.dumps(FetchError("dataset_not_found", "Gone. Upload it.")))
    assert (clone.code, clone.message, str(clone)) == (
        "dataset_not_found",
        "Gone. Upload it.",
        "Gone. Upload it.",
    )
