"""nginx/: the rendered configuration passes `nginx -t`, says what it must, and behaves.

The traffic tests (marked ``stack``) run the real Debian nginx, unprivileged, in front of two
small stdlib HTTP servers on loopback ports that record every request they receive: load is
spread, GETs survive an instance dying mid-stream, a POST that reached a crashing instance is
answered 502 and never re-sent to the other one, limit_req answers 429, X-Request-ID is passed
or generated, /metrics is 404, bodies over 1 MiB get 413, JSON is gzipped, the access log is
JSON with upstream timing, and the TLS server answers with HSTS.
"""

from __future__ import annotations

import contextlib
import gzip
import http.client
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from tlskit import CertificateAuthority

from testkit import free_port, load_module, port_open, require_binary, wait_until
from tools.kit import drop_to, unprivileged_user

pytestmark = pytest.mark.deploy

ROOT = Path(__file__).resolve().parents[2]
NGINX_DIR = ROOT / "nginx"
NGINX_USER = "fastapi-nginx"


render = load_module(NGINX_DIR / "render.py", "nginx_render")


def nginx_binary() -> str:
    return require_binary("nginx", hint="apt-get install nginx-light")


def strip_comments(text: str) -> str:
    return "\n".join(line.split("#", 1)[0] for line in text.splitlines())


def block(text: str, header: str) -> str:
    """The body of the first ``header { ... }`` block (braces balanced)."""
    start = text.index(header)
    depth = 0
    for index in range(text.index("{", start), len(text)):
        if text[index] == "{":
            depth += 1
        elif text[index] == "}":
            depth -= 1
            if depth == 0:
                return text[text.index("{", start) + 1 : index]
    raise AssertionError(f"unbalanced block {header!r}")


@pytest.fixture
def out_dir() -> Iterator[Path]:
    """A directory under /tmp every user can traverse (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="fastapi-nginx-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def base_env(**overrides: str) -> dict[str, str]:
    env = {
        "UPSTREAM_SERVERS": "127.0.0.1:18001 127.0.0.1:18002",
        "LISTEN_PORT": str(free_port()),
        "STATUS_LISTEN": f"127.0.0.1:{free_port()}",
    }
    env.update(overrides)
    return env


@dataclass(frozen=True)
class ServerCertificate:
    cert: Path
    key: Path
    ca: Path  # what a client trusts to verify ``cert``


def server_certificate(directory: Path) -> ServerCertificate:
    """A certificate for localhost and 127.0.0.1, signed by a CA made here (tlskit)."""
    ca = CertificateAuthority.create(directory, "nginx-test-ca")
    issued = ca.issue(
        directory, "tls", common_name="localhost", dns=("localhost",), ips=("127.0.0.1",)
    )
    issued.key.chmod(0o644)  # test-only key, readable by the unprivileged nginx user
    return ServerCertificate(issued.cert, issued.key, ca.path)


def nginx_t(out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [nginx_binary(), "-t", "-q", "-p", str(out), "-c", str(out / "nginx.conf")],
        # /dev/stdout (the default access log) must be openable by the unprivileged user.
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        check=False,
        **as_nginx_user(out),
    )


# --- static checks -------------------------------------------------------------------------------
def test_rendered_config_passes_nginx_t(out_dir: Path) -> None:
    files = render.render(out_dir, base_env())
    names = sorted(path.relative_to(out_dir).as_posix() for path in files)
    assert names == [
        "conf.d/10-fastapi-app.conf",
        "nginx.conf",
        "snippets/fastapi-app-errors.conf",
        "snippets/fastapi-app-locations.conf",
    ], "no TLS server without certificates"
    result = nginx_t(out_dir)
    assert result.returncode == 0, result.stderr


def test_tls_server_rendered_only_with_certificates(out_dir: Path) -> None:
    certificate = server_certificate(out_dir)
    env = base_env(
        TLS_CERTIFICATE=str(certificate.cert),
        TLS_CERTIFICATE_KEY=str(certificate.key),
        TLS_LISTEN_PORT=str(free_port()),
    )
    files = render.render(out_dir / "conf", env)
    tls = out_dir / "conf" / "conf.d" / "20-fastapi-app-tls.conf"
    assert tls in files
    text = strip_comments(tls.read_text())
    assert "ssl_protocols TLSv1.2 TLSv1.3;" in text
    assert re.search(
        r'add_header Strict-Transport-Security "max-age=\d+; includeSubDomains" always;', text
    )
    assert f"ssl_certificate {certificate.cert};" in text
    assert "include snippets/fastapi-app-locations.conf;" in text
    result = nginx_t(out_dir / "conf")
    assert result.returncode == 0, result.stderr


def test_cli_renders_from_the_environment(out_dir: Path) -> None:
    env = {**os.environ, **base_env(UPSTREAM_SERVERS="127.0.0.1:8001,127.0.0.1:8002")}
    result = subprocess.run(
        ["python3", str(NGINX_DIR / "render.py"), "--out", str(out_dir), "--foreground"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    main = (out_dir / "nginx.conf").read_text()
    assert main.startswith("daemon off;")
    assert f"pid {out_dir}/run/nginx.pid;" in main
    assert "/tmp/" not in strip_comments(main).replace(str(out_dir), "")
    conf = (out_dir / "conf.d" / "10-fastapi-app.conf").read_text()
    assert "server 127.0.0.1:8001 max_fails=3 fail_timeout=10s;" in conf
    assert "server 127.0.0.1:8002 max_fails=3 fail_timeout=10s;" in conf


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("UPSTREAM_SERVERS", "127.0.0.1:9000"),  # the metrics port is never proxied
        ("UPSTREAM_SERVERS", "127.0.0.1:8000; include /etc/passwd"),
        ("LISTEN_PORT", "8080; include /etc/shadow"),
        ("LIMIT_REQ_RATE", "10r/s }"),
        ("UPSTREAM_SERVERS", " "),
    ],
)
def test_renderer_rejects_unsafe_values(out_dir: Path, name: str, value: str) -> None:
    with pytest.raises(render.RenderError):
        render.render(out_dir, base_env(**{name: value}))


def _official_envsubst(template: str, env: dict[str, str]) -> str:
    """What the official image's 20-envsubst-on-templates.sh does: envsubst restricted to the
    names defined in the environment (both $NAME and ${NAME} forms)."""
    if shutil.which("envsubst"):
        shell_format = " ".join(f"${{{name}}}" for name in env)
        return subprocess.run(
            ["envsubst", shell_format],
            input=template,
            env={"PATH": os.environ.get("PATH", ""), **env},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    for name, value in env.items():
        template = template.replace(f"${{{name}}}", value)
        template = re.sub(rf"\${name}(?![A-Za-z0-9_])", _literally(value), template)
    return template


def _literally(text: str) -> Callable[[re.Match[str]], str]:
    """A re.sub replacement that inserts ``text`` as is (no backslash or group expansion)."""
    return lambda _match: text


def test_templates_work_with_the_official_image_envsubst(out_dir: Path) -> None:
    servers = " ".join(f"server 10.0.0.{n}:8000 max_fails=3 fail_timeout=10s;" for n in (5, 6))
    env = {**render.DEFAULTS, "UPSTREAM_SERVERS": servers, "TLS_CERTIFICATE": "/c.pem"}
    env["TLS_CERTIFICATE_KEY"] = "/k.pem"
    render.render(out_dir, env)
    for template in sorted((NGINX_DIR / "templates").glob("*.conf.template")):
        official = _official_envsubst(template.read_text(), env)
        ours = (out_dir / "conf.d" / template.name.removesuffix(".template")).read_text()
        assert "${" not in strip_comments(official), f"{template.name}: unset variable"
        # Same directives; only the upstream's line breaks differ.
        assert strip_comments(official).split() == strip_comments(ours).split()


def test_key_directives(out_dir: Path) -> None:
    render.render(out_dir, base_env())
    main = strip_comments((out_dir / "nginx.conf").read_text())
    conf = strip_comments((out_dir / "conf.d" / "10-fastapi-app.conf").read_text())
    locations = strip_comments((out_dir / "snippets" / "fastapi-app-locations.conf").read_text())
    everything = "\n".join((main, conf, locations))

    assert "health_check" not in everything, "NGINX Plus only"
    assert "server_tokens off;" in main
    # Passive health and keepalive to several instances.
    upstream = block(conf, "upstream fastapi_app")
    assert len(re.findall(r"server \S+ max_fails=\d+ fail_timeout=\d+s;", upstream)) == 2
    assert re.search(r"keepalive \d+;", upstream)
    assert "proxy_http_version 1.1;" in conf
    assert 'proxy_set_header Connection "";' in conf
    # Retries: 502 only where the method is idempotent; never non_idempotent; never the app's
    # 503 (it would count towards max_fails: see test_app_503s_pass_through_and_mark_nothing_down).
    retrying = re.findall(r"proxy_next_upstream ([^;]*);", everything)
    assert retrying == ["error timeout http_502", "error timeout"]
    assert "http_503" not in everything
    assert "proxy_intercept_errors on" not in everything, "the app's problem+json must pass"
    assert "http_502" in block(locations, "location / ")
    assert "http_50" not in block(locations, "location @fastapi_app_non_idempotent")
    assert not any("non_idempotent" in conditions.split() for conditions in retrying)
    idempotent = block(conf, "map $request_method $fastapi_app_idempotent")
    assert sorted(re.findall(r"(\w+) 1;", idempotent)) == [
        "DELETE",
        "GET",
        "HEAD",
        "OPTIONS",
        "PUT",
    ]
    assert "POST" not in idempotent
    assert "PATCH" not in idempotent
    assert re.search(r"proxy_next_upstream_tries [1-9]\d*;", conf)
    assert re.search(r"proxy_next_upstream_timeout [1-9]\d*s;", conf)
    # Forwarded headers and request id.
    for header in ("X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host", "X-Request-ID"):
        assert f"proxy_set_header {header} " in conf
    assert "$http_x_request_id" in conf
    assert "$request_id;" in conf
    # Limits.
    assert re.search(r"limit_req_zone \$fastapi_app_limit_key zone=\w+:\d+m rate=\d+r/s;", conf)
    assert re.search(r"limit_req zone=\w+ burst=\d+ nodelay;", conf)
    assert "limit_req_status 429;" in conf
    assert "client_max_body_size 1m;" in conf
    # Metrics never exposed.
    assert "return 404;" in block(locations, "location ^~ /metrics")
    assert ":9000" not in everything
    # Compression and logs.
    assert "gzip_types application/json application/problem+json;" in conf
    log_format = conf[conf.index("log_format") : conf.index("access_log")]
    for variable in (
        "$upstream_response_time",
        "$upstream_connect_time",
        "$upstream_addr",
        "$request_time",
        "$fastapi_app_request_id",
    ):
        assert variable in log_format
    assert "escape=json" in log_format
    for directive in ("proxy_connect_timeout", "proxy_read_timeout", "client_body_timeout"):
        assert directive in everything


def test_client_max_body_size_matches_the_app() -> None:
    size = render.DEFAULTS["CLIENT_MAX_BODY_SIZE"]
    assert size == "1m"
    assert 1024 * 1024 == 1048576  # MAX_REQUEST_BODY_BYTES default (contract)


def test_request_id_rule_is_the_apps() -> None:
    # One rule for a usable incoming id: an id nginx passes is one the app keeps, so the header a
    # client sees, the problem body and the log lines agree (issue 9; end to end in
    # tests/stack/test_request_id_nginx.py).
    from service.observability.request_id import VALID_ID_PATTERN

    template = (NGINX_DIR / "templates" / "10-fastapi-app.conf.template").read_text()
    match = re.search(
        r'map \$http_x_request_id \$fastapi_app_request_id \{\s*"~\^(.+?)\$"', template
    )
    assert match is not None
    assert match.group(1) == VALID_ID_PATTERN


# --- real traffic ---------------------------------------------------------------------------------
@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Upstream:
    """A tiny HTTP/1.1 app instance that records what it receives and answers JSON.

    ``mode = "drop"`` simulates a worker dying mid-request: the request is read completely, then
    the connection is closed without an answer. ``mode = "503"`` answers 503 problem+json, as
    the app does while PostgreSQL is down.
    """

    name: str
    mode: str = "ok"
    seen: list[Seen] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    connections: set[socket.socket] = field(default_factory=set)

    def __post_init__(self) -> None:
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                with upstream.lock:
                    upstream.connections.add(self.connection)

            def finish(self) -> None:
                with contextlib.suppress(OSError):
                    super().finish()
                with upstream.lock:
                    upstream.connections.discard(self.connection)

            def handle_any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with upstream.lock:
                    upstream.seen.append(Seen(self.command, self.path, dict(self.headers), body))
                if upstream.mode == "drop":
                    self.close_connection = True
                    with contextlib.suppress(OSError):
                        self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if upstream.mode == "503":
                    problem = json.dumps({"status": 503, "upstream": upstream.name}).encode()
                    self.send_response(503)
                    self.send_header("Content-Type", "application/problem+json")
                    self.send_header("Retry-After", "1")
                    self.send_header("Content-Length", str(len(problem)))
                    self.end_headers()
                    self.wfile.write(problem)
                    return
                document: dict[str, Any] = {
                    "upstream": upstream.name,
                    "method": self.command,
                    "request_id": self.headers.get("X-Request-ID"),
                    "bytes": len(body),
                }
                if self.path.startswith("/big"):
                    document["padding"] = ["task"] * 2000
                payload = json.dumps(document).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.send_header("X-Request-ID", "from-upstream")  # nginx must replace it
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = handle_any  # noqa: N815

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()
        self.alive = True

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    def requests(self, method: str | None = None) -> list[Seen]:
        with self.lock:
            return [item for item in self.seen if method is None or item.method == method]

    def kill(self) -> None:
        """Stop listening and cut every open connection (what a SIGKILLed process looks like)."""
        if not self.alive:
            return
        self.alive = False
        self.server.shutdown()
        self.server.server_close()
        with self.lock:
            connections = list(self.connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                connection.close()


@pytest.fixture
def upstreams() -> Iterator[tuple[Upstream, Upstream]]:
    pair = (Upstream("a"), Upstream("b"))
    yield pair
    for upstream in pair:
        upstream.kill()


def as_nginx_user(out: Path) -> dict[str, Any]:
    """Run nginx as an unprivileged user owning ``out``: proof that no root is needed."""
    user = unprivileged_user(NGINX_USER)
    if user is None:
        return {}
    subprocess.run(["chown", "-R", f"{user.pw_uid}:{user.pw_gid}", str(out)], check=True)
    return drop_to(user)


@dataclass
class Nginx:
    process: subprocess.Popen[bytes]
    port: int
    out: Path
    tls_port: int | None = None

    @property
    def access_log(self) -> Path:
        return self.out / "logs" / "access.log"

    def error_log(self) -> str:
        path = self.out / "nginx.stderr"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def request(
        self,
        method: str,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        body: bytes | None = None,
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
        try:
            # nginx may answer (413) before it has read the whole body.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, response.headers, response.read()
        finally:
            connection.close()


@pytest.fixture
def start_nginx(out_dir: Path) -> Iterator[Callable[..., Nginx]]:
    started: list[Nginx] = []

    def start(upstreams: tuple[Upstream, ...], **overrides: str) -> Nginx:
        binary = nginx_binary()
        out = out_dir / f"nginx-{len(started)}"
        port = free_port()
        env = base_env(
            UPSTREAM_SERVERS=" ".join(upstream.address for upstream in upstreams),
            LISTEN_PORT=str(port),
            ACCESS_LOG=str(out / "logs" / "access.log"),
            UPSTREAM_FAIL_TIMEOUT="30s",
            **overrides,
        )
        render.render(out, env, foreground=True)
        stderr = (out / "nginx.stderr").open("wb")
        process = subprocess.Popen(
            [binary, "-p", str(out), "-c", str(out / "nginx.conf")],
            stdout=stderr,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **as_nginx_user(out),
        )
        tls_port = int(overrides["TLS_LISTEN_PORT"]) if "TLS_LISTEN_PORT" in overrides else None
        server = Nginx(process, port, out, tls_port)
        started.append(server)
        wait_until(
            lambda: process.poll() is not None or port_open(port),
            timeout=10,
            what=f"nginx listening on {port}",
        )
        assert process.poll() is None, f"nginx exited:\n{server.error_log()}"
        return server

    yield start
    for server in started:
        process = server.process
        if process.poll() is None:
            process.send_signal(signal.SIGQUIT)  # graceful
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)  # its own session: only our nginx
                process.wait(timeout=5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # stray workers, if any


def _json(body: bytes) -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(body)
    return parsed


@pytest.mark.stack
def test_spreads_load_and_survives_an_instance_dying(
    upstreams: tuple[Upstream, Upstream], start_nginx: Callable[..., Nginx]
) -> None:
    a, b = upstreams
    nginx = start_nginx(upstreams, LIMIT_REQ_RATE="10000r/s", LIMIT_REQ_BURST="10000")
    served_by = [_json(nginx.request("GET", "/v1/tasks")[2])["upstream"] for _ in range(20)]
    assert set(served_by) == {"a", "b"}, served_by
    assert min(served_by.count("a"), served_by.count("b")) >= 5, served_by

    statuses: list[int] = []
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            statuses.append(nginx.request("GET", "/v1/tasks")[0])

    workers = [threading.Thread(target=hammer) for _ in range(4)]
    for worker in workers:
        worker.start()
    wait_until(lambda: len(statuses) >= 20, timeout=10, what="traffic flowing")
    before = len(statuses)
    b.kill()
    wait_until(lambda: len(statuses) >= before + 40, timeout=10, what="traffic after the kill")
    stop.set()
    for worker in workers:
        worker.join(timeout=20)
    assert before > 0
    assert len(statuses) > before, "requests kept flowing after the kill"
    assert set(statuses) == {200}, f"non-200 while an instance died: {sorted(set(statuses))}"
    after = [_json(nginx.request("GET", "/v1/tasks")[2])["upstream"] for _ in range(5)]
    assert after == ["a"] * 5
    del a


@pytest.mark.stack
def test_post_that_reached_a_dying_instance_is_not_resent(
    upstreams: tuple[Upstream, Upstream], start_nginx: Callable[..., Nginx]
) -> None:
    a, b = upstreams
    nginx = start_nginx(upstreams)
    b.mode = "drop"  # reads the request, then dies without answering
    outcomes: dict[str, int] = {}
    for _ in range(6):
        marker = uuid.uuid4().hex
        status, _, _ = nginx.request(
            "POST",
            "/v1/tasks",
            headers={"Content-Type": "application/json"},
            body=json.dumps({"title": marker}).encode(),
        )
        outcomes[marker] = status
        if status == 502:
            break
    dropped = [marker for marker, status in outcomes.items() if status == 502]
    assert dropped, f"no POST reached the dying instance: {outcomes}"
    assert set(outcomes.values()) <= {200, 502}
    posted_to_a = [item.body for item in a.requests("POST")]
    posted_to_b = [item.body for item in b.requests("POST")]
    for marker in dropped:
        assert any(marker.encode() in body for body in posted_to_b), "it was sent to b"
        assert not any(marker.encode() in body for body in posted_to_a), (
            "a POST already sent to one instance was re-sent to another"
        )
    for marker, status in outcomes.items():
        copies = sum(marker.encode() in body for body in posted_to_a + posted_to_b)
        assert copies == 1, f"{marker} ({status}) was received {copies} times"

    # The same failure on a GET is retried on the healthy instance.
    gets = [nginx.request("GET", f"/v1/tasks?n={n}") for n in range(6)]
    assert [status for status, _, _ in gets] == [200] * 6
    assert {_json(body)["upstream"] for _, _, body in gets} == {"a"}


@pytest.mark.stack
def test_app_503s_pass_through_and_mark_nothing_down(
    upstreams: tuple[Upstream, Upstream], start_nginx: Callable[..., Nginx]
) -> None:
    """A database outage makes every instance answer 503 at once: nginx must pass those through
    and keep both instances in rotation, so service resumes with the database, not fail_timeout
    (10 s) later."""
    a, b = upstreams
    nginx = start_nginx(upstreams, LIMIT_REQ_RATE="10000r/s", LIMIT_REQ_BURST="10000")
    a.mode = b.mode = "503"
    outage = [nginx.request("GET", f"/v1/tasks?n={n}") for n in range(12)]  # > 2 x max_fails
    assert [status for status, _, _ in outage] == [503] * 12
    for _, headers, body in outage:
        assert headers["Content-Type"] == "application/problem+json"
        assert headers["Retry-After"] == "1"
        assert _json(body)["status"] == 503  # the app's own body, not nginx's
    # Each 503 reached exactly one instance: not retried on the other.
    assert len(a.requests("GET")) + len(b.requests("GET")) == 12
    a.mode = b.mode = "ok"
    recovered = [nginx.request("GET", f"/v1/tasks?r={n}") for n in range(6)]
    assert [status for status, _, _ in recovered] == [200] * 6
    assert {_json(body)["upstream"] for _, _, body in recovered} == {"a", "b"}


@pytest.mark.stack
def test_nginx_own_errors_are_problem_json(
    upstreams: tuple[Upstream, Upstream], start_nginx: Callable[..., Nginx]
) -> None:
    a, b = upstreams
    nginx = start_nginx(upstreams, LIMIT_REQ_RATE="1r/s", LIMIT_REQ_BURST="1")
    status, headers, body = nginx.request(
        "POST", "/v1/tasks", headers={"Content-Type": "application/json"}, body=b"x" * 2**21
    )
    assert (status, headers["Content-Type"]) == (413, "application/problem+json")
    assert _json(body) == {
        "type": "about:blank",
        "title": "Content Too Large",
        "status": 413,
        "detail": "The request body is larger than this server accepts.",
    }
    assert headers.get("X-Request-ID")
    limited = [nginx.request("GET", "/v1/tasks") for _ in range(6)]
    status, headers, body = next(answer for answer in limited if answer[0] == 429)
    assert headers["Content-Type"] == "application/problem+json"
    assert _json(body)["status"] == 429
    assert headers.get("X-Request-ID")
    a.kill()
    b.kill()
    status, headers, body = nginx.request("GET", "/health/live")
    assert (status, headers["Content-Type"]) == (502, "application/problem+json")
    assert _json(body)["title"] == "Bad Gateway"
    assert headers.get("X-Request-ID")


@pytest.mark.stack
def test_rate_limit_answers_429_per_client_ip(
    upstreams: tuple[Upstream, Upstream], start_nginx: Callable[..., Nginx]
) -> None:
    nginx = start_nginx(upstreams, LIMIT_REQ_RATE="2r/s", LIMIT_REQ_BURST="3")
    statuses = [nginx.request("GET", "/v1/tasks")[0] for _ in range(15)]
    assert statuses[:4] == [200] * 4, statuses  # 1 + burst
    assert statuses.count(429) >= 8, statuses
    status, headers, _ = nginx.request("GET", "/v1/tasks")
    assert status == 429
    assert headers.get("X-Request-ID"), "nginx's own answers carry a request id too"
    # Probes are not rate limited.
    probes = [nginx.request("GET", "/health/live")[0] for _ in range(15)]
    assert probes == [200] * 15


@pytest.mark.stack
def test_request_id_generated_or_passed_through(
    upstreams: tuple[Upstream, Upstream], start_nginx: Callable[..., Nginx]
) -> None:
    nginx = start_nginx(upstreams)
    status, headers, body = nginx.request("GET", "/v1/tasks")
    assert status == 200
    generated = _json(body)["request_id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated), generated
    assert headers.get_all("X-Request-ID") == [generated], "exactly one, the one sent upstream"

    given = "req-" + uuid.uuid4().hex
    status, headers, body = nginx.request("GET", "/v1/tasks", headers={"X-Request-ID": given})
    assert _json(body)["request_id"] == given
    assert headers.get_all("X-Request-ID") == [given]

    for hostile in ("x" * 300, "abc", "a b c d e f"):  # too long, too short (app: 8-128), space
        _, headers, body = nginx.request("GET", "/v1/tasks", headers={"X-Request-ID": hostile})
        replaced = _json(body)["request_id"]
        assert re.fullmatch(r"[0-9a-f]{32}", replaced), "ids the app would not keep are replaced"
        assert headers.get_all("X-Request-ID") == [replaced]


@pytest.mark.stack
def test_forwarded_headers_reach_the_app(
    upstreams: tuple[Upstream, Upstream], start_nginx: Callable[..., Nginx]
) -> None:
    a, b = upstreams
    nginx = start_nginx(upstreams)
    nginx.request("GET", "/v1/tasks", headers={"Host": "api.example.test"})
    seen = (a.requests() + b.requests())[-1].headers
    lowered = {key.lower(): value for key, value in seen.items()}
    assert lowered["x-forwarded-for"] == "127.0.0.1"
    assert lowered["x-forwarded-proto"] == "http"
    assert lowered["x-forwarded-host"] == "api.example.test"
    assert lowered["host"] == "api.example.test"
    assert lowered["x-real-ip"] == "127.0.0.1"


@pytest.mark.stack
def test_metrics_hidden_and_body_limit(
    upstreams: tuple[Upstream, Upstream], start_nginx: Callable[..., Nginx]
) -> None:
    a, b = upstreams
    nginx = start_nginx(upstreams)
    for path in ("/metrics", "/metrics/", "/metrics?x=1"):
        status, _, _ = nginx.request("GET", path)
        assert status == 404, path
    assert not [item for item in a.requests() + b.requests() if item.path.startswith("/metrics")]

    too_big = b"x" * (1024 * 1024 + 1)
    status, _, _ = nginx.request(
        "POST", "/v1/tasks", headers={"Content-Type": "application/json"}, body=too_big
    )
    assert status == 413
    fits = b"y" * (1024 * 1024 - 1024)
    status, _, body = nginx.request(
        "POST", "/v1/tasks", headers={"Content-Type": "application/json"}, body=fits
    )
    assert status == 200
    assert _json(body)["bytes"] == len(fits)


@pytest.mark.stack
def test_server_header_hides_version(
    upstreams: tuple[Upstream, Upstream], start_nginx: Callable[..., Nginx]
) -> None:
    nginx = start_nginx(upstreams)
    _, headers, _ = nginx.request("GET", "/metrics")
    assert headers.get("Server") == "nginx"


@pytest.mark.stack
def test_json_is_gzipped_and_access_log_is_json(
    upstreams: tuple[Upstream, Upstream], start_nginx: Callable[..., Nginx]
) -> None:
    nginx = start_nginx(upstreams)
    status, headers, body = nginx.request("GET", "/big", headers={"Accept-Encoding": "gzip"})
    assert status == 200
    assert headers.get("Content-Encoding") == "gzip"
    assert _json(gzip.decompress(body))["padding"][0] == "task"
    nginx.request("GET", "/v1/tasks", headers={"X-Request-ID": "log-check-1"})

    def logged() -> dict[str, Any] | None:
        lines = nginx.access_log.read_text().splitlines()
        entries = [json.loads(line) for line in lines if line.strip()]
        return next((entry for entry in entries if entry["request_id"] == "log-check-1"), None)

    entry = wait_until(logged, timeout=5, what="the access log line")
    assert entry["status"] == 200
    assert entry["method"] == "GET"
    assert entry["upstream_addr"] in {upstream.address for upstream in upstreams}
    assert float(entry["upstream_response_time"]) >= 0
    assert float(entry["upstream_connect_time"]) >= 0
    assert isinstance(entry["request_time"], float | int)


@pytest.mark.stack
def test_tls_server_answers_with_hsts(
    upstreams: tuple[Upstream, Upstream], start_nginx: Callable[..., Nginx], out_dir: Path
) -> None:
    certificate = server_certificate(out_dir)
    tls_port = free_port()
    nginx = start_nginx(
        upstreams,
        TLS_CERTIFICATE=str(certificate.cert),
        TLS_CERTIFICATE_KEY=str(certificate.key),
        TLS_LISTEN_PORT=str(tls_port),
    )
    wait_until(lambda: port_open(tls_port), timeout=5, what="the TLS listener")
    context = ssl.create_default_context(cafile=str(certificate.ca))
    connection = http.client.HTTPSConnection("localhost", tls_port, context=context, timeout=10)
    try:
        connection.request("GET", "/v1/tasks")
        response = connection.getresponse()
        body = response.read()
        assert response.status == 200
        assert _json(body)["upstream"] in {"a", "b"}
        assert "max-age=" in (response.getheader("Strict-Transport-Security") or "")
        assert response.getheader("X-Request-ID")
        assert isinstance(connection.sock, ssl.SSLSocket)
        assert connection.sock.version() == "TLSv1.3"
    finally:
        connection.close()
    tls12 = ssl.create_default_context(cafile=str(certificate.ca))
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2
    connection = http.client.HTTPSConnection("localhost", tls_port, context=tls12, timeout=10)
    try:
        connection.request("GET", "/health/live")
        assert connection.getresponse().status == 200
    finally:
        connection.close()
    assert nginx.process.poll() is None
