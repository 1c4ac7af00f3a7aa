"""Networked jails and dependency builds reach out through the egress proxy alone: never the
host's loopback (where the broker and the API listen), private ranges, link-local or cloud
metadata addresses, unless the operator allows a host.

Everything is real: firejail, the jailed interpreters, the relay in the jail, the proxy in the
worker, pip building a package from a local index whose build backend is hostile.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import socket
import tarfile
import tempfile
import threading
import uuid
from functools import partial
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from spider.bundle import build_bundle, tool_spec
from spider.config import RuntimeConfig, SandboxLimits
from spider.errors import SandboxError
from spider.policy import Policy
from spider.sandbox import Sandbox
from spider.sandbox.egress import EgressProxy, EgressRules
from spider.sandbox.venvs import check_sources

pytestmark = pytest.mark.usefixtures("firejail")

LIMITS = SandboxLimits(memory_mb=512, call_timeout_s=15.0, cpu_seconds=20)
NETWORKED = RuntimeConfig(network=True, limits=LIMITS)
JOB_SECRET = "job-secret-" + uuid.uuid4().hex


# -- what the jailed code tries (shipped by value) ---------------------------------------------


def ping() -> str:
    return "pong"


def interfaces() -> list:
    with open("/proc/net/dev") as dev:
        return sorted(line.split(":")[0].strip() for line in dev.readlines()[2:])


def direct_connect(host: str, port: int) -> str:
    import socket

    try:
        socket.create_connection((host, port), timeout=3).close()
        return "connected"
    except OSError as exc:
        return f"blocked: {type(exc).__name__}"


def proxy_connect(host: str, port: int) -> str:
    """CONNECT through the proxy the environment names; the status line, and on success what an
    HTTP GET through the tunnel answered."""
    import os
    import socket

    proxy = os.environ["HTTPS_PROXY"].rsplit("/", 1)[-1]
    proxy_host, proxy_port = proxy.rsplit(":", 1)
    with socket.create_connection((proxy_host, int(proxy_port)), timeout=10) as conn:
        conn.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        reader = conn.makefile("rb")
        status = reader.readline().decode().strip()
        if " 200 " not in status + " ":
            return status
        while reader.readline() not in (b"\r\n", b""):
            pass
        conn.sendall(b"GET /through-the-tunnel HTTP/1.0\r\nHost: x\r\n\r\n")
        return status + " | " + reader.read().decode(errors="replace").split("\r\n\r\n", 1)[-1]


def proxy_get(url: str) -> str:
    """An ordinary HTTP client (urllib, which reads the proxy variables)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return f"ok: {answer.read().decode()}"
    except urllib.error.HTTPError as exc:
        return f"refused: {exc.code} {exc.reason}"
    except urllib.error.URLError as exc:
        return f"refused: {exc.reason}"


def unix_connect(path: str) -> str:
    import socket

    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(path)
        return "connected"
    except OSError as exc:
        return f"blocked: {type(exc).__name__}"


TOOLS = [ping, interfaces, direct_connect, proxy_connect, proxy_get, unix_connect]


# -- fixtures ----------------------------------------------------------------------------------


class Listener:
    """A TCP server on the host's loopback that records every connection (a stand-in for Redis)."""

    def __init__(self):
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(16)
        self.port = self.server.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.accepted += 1
            conn.sendall(b"-NOAUTH but you got in\r\n")
            conn.close()


class Hello(BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"hello from {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def redis_standin():
    listener = Listener()
    yield listener
    listener.server.close()


@pytest.fixture(scope="module")
def http_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


def make_sandbox(policy: Policy):
    base = Path(tempfile.mkdtemp(prefix="spider-net-test-", dir="/tmp"))
    base.chmod(0o755)
    return base, Sandbox(base / "root", pool_size=1, policy=policy)


@pytest.fixture(scope="module")
def sandbox():
    base, box = make_sandbox(Policy())
    yield box
    box.close()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def job(sandbox):
    bundle = build_bundle(tools=[(f, tool_spec(f)) for f in TOOLS])
    opened = sandbox.open_job("net-" + uuid.uuid4().hex[:8], bundle, NETWORKED, {"JOB_TOKEN": JOB_SECRET})
    yield opened
    sandbox.close_job(opened.job_id)


def call(job, tool, /, **arguments):
    outcome = job.call_tool(tool, arguments)
    assert outcome.ok, outcome.error
    return outcome.content


# -- jobs with runtime.network ------------------------------------------------------------------


def test_a_networked_jail_has_its_own_loopback_and_nothing_else(job, redis_standin):
    assert json.loads(call(job, "interfaces")) == ["lo"]
    assert call(job, "direct_connect", host="127.0.0.1", port=redis_standin.port) == "blocked: ConnectionRefusedError"
    assert call(job, "direct_connect", host="127.0.0.1", port=6379).startswith("blocked")  # the real broker's port
    assert call(job, "direct_connect", host="10.255.255.53", port=53).startswith("blocked")
    assert call(job, "direct_connect", host="1.1.1.1", port=443).startswith("blocked")
    assert redis_standin.accepted == 0
    assert call(job, "ping") == "pong"


@pytest.mark.parametrize(
    "host, port, reason",
    [
        ("127.0.0.1", "standin", "a loopback address"),
        ("localhost", "standin", "a loopback address"),
        ("[::1]", "standin", "a loopback address"),
        ("[::ffff:127.0.0.1]", "standin", "a loopback address"),
        ("127.0.0.1", 6379, "a loopback address"),
        ("0.0.0.0", "standin", "an unspecified address"),
        ("10.0.0.1", 6379, "a private address"),
        ("192.168.1.1", 80, "a private address"),
        ("169.254.169.254", 80, "a link-local address"),
        ("100.100.100.200", 80, "a cloud metadata address"),
    ],
)
def test_connect_to_the_host_private_or_metadata_addresses_is_refused(job, redis_standin, host, port, reason):
    port = redis_standin.port if port == "standin" else port
    status = call(job, "proxy_connect", host=host, port=port)
    assert status.startswith("HTTP/1.1 403 Forbidden") and reason in status, status
    assert redis_standin.accepted == 0


def test_plain_http_to_forbidden_addresses_is_refused_with_the_reason(job, redis_standin, http_server):
    answer = call(job, "proxy_get", url="http://169.254.169.254/latest/meta-data/iam/security-credentials/")
    assert answer.startswith("refused: 403") and "link-local" in answer, answer
    answer = call(job, "proxy_get", url=f"http://localhost:{http_server}/secrets")
    assert answer.startswith("refused: 403") and "loopback" in answer, answer
    answer = call(job, "proxy_get", url=f"http://10.1.2.3:{http_server}/secrets")
    assert answer.startswith("refused: 403") and "private" in answer, answer
    answer = call(job, "proxy_get", url=f"https://127.0.0.1:{redis_standin.port}/")  # CONNECT, from urllib
    assert answer.startswith("refused: Tunnel connection failed: 403") and "loopback" in answer, answer
    assert redis_standin.accepted == 0


def test_an_operator_allowed_host_is_reachable_through_the_proxy(http_server):
    base, box = make_sandbox(Policy(allowed_hosts=("127.0.0.1",)))
    try:
        bundle = build_bundle(tools=[(f, tool_spec(f)) for f in TOOLS])
        opened = box.open_job("allowed-" + uuid.uuid4().hex[:8], bundle, NETWORKED, {})
        # An ordinary client, plain HTTP through the proxy.
        assert call(opened, "proxy_get", url=f"http://127.0.0.1:{http_server}/hello") == "ok: hello from /hello"
        # A tunnel (what https and any other TCP protocol use).
        tunnel = call(opened, "proxy_connect", host="127.0.0.1", port=http_server)
        assert tunnel == "HTTP/1.1 200 Connection established | hello from /through-the-tunnel"
        # Only that host: the rest of loopback stays closed.
        answer = call(opened, "proxy_get", url=f"http://127.0.0.2:{http_server}/hello")
        assert answer.startswith("refused: 403") and "loopback" in answer, answer
        # Direct connections still go nowhere.
        assert call(opened, "direct_connect", host="127.0.0.1", port=http_server) == "blocked: ConnectionRefusedError"
    finally:
        box.close()
        shutil.rmtree(base, ignore_errors=True)


def test_a_jobs_proxy_socket_is_its_own(sandbox, job):
    socket_path = sandbox.root / "jobs" / job.job_id / "egress" / "proxy.sock"
    assert socket_path.is_socket()
    bundle = build_bundle(tools=[(f, tool_spec(f)) for f in TOOLS])
    for runtime in (RuntimeConfig(limits=LIMITS), NETWORKED):
        other = sandbox.open_job("other-" + uuid.uuid4().hex[:8], bundle, runtime, {})
        try:
            assert call(other, "unix_connect", path=str(socket_path)) == "blocked: FileNotFoundError"
        finally:
            sandbox.close_job(other.job_id)
    assert call(job, "unix_connect", path=str(socket_path)) == "connected"


def test_the_operator_can_switch_networking_off(http_server):
    base, box = make_sandbox(Policy(sandbox_network=False))
    try:
        bundle = build_bundle(tools=[(ping, tool_spec(ping))])
        with pytest.raises(SandboxError, match="runtime.network is switched off.*SPIDER_SANDBOX_NETWORK"):
            box.open_job("no-net", bundle, NETWORKED, {})
        assert box.open_job("no-net", bundle, RuntimeConfig(limits=LIMITS), {}).call_tool("ping", {}).content == "pong"
    finally:
        box.close()
        shutil.rmtree(base, ignore_errors=True)


def test_the_proxy_refuses_what_is_not_a_proxy_request(tmp_path):
    with EgressProxy(tmp_path / "proxy.sock", EgressRules()) as proxy:
        for request in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"CONNECT 127.0.0.1 HTTP/1.1\r\n\r\n", b"hello\r\n\r\n"):
            with socket.socket(socket.AF_UNIX) as client:
                client.connect(str(proxy.socket_path))
                client.sendall(request)
                assert client.recv(4096).startswith(b"HTTP/1.1 400 "), request
    assert not (tmp_path / "proxy.sock").exists()


# -- dependency builds --------------------------------------------------------------------------


def test_requirements_that_do_not_name_an_index_package_are_refused():
    refused = [
        "pkg @ https://example.com/pkg-1.0.tar.gz",
        "pkg@file:///etc/passwd",
        "git+https://github.com/someone/pkg",
        "pkg @ git+https://github.com/someone/pkg",
        "https://example.com/pkg-1.0-py3-none-any.whl",
        "./local/project",
        "/tmp/pkg-1.0.tar.gz",
        "pkg-1.0-py3-none-any.whl",
    ]
    for requirement in refused:
        with pytest.raises(SandboxError, match="SPIDER_ALLOW_DIRECT_URL_PACKAGES"):
            check_sources([requirement], allow_direct_url=False)
        check_sources([requirement], allow_direct_url=True)
    check_sources(["requests>=2", "pyjokes==0.8.3", 'numpy[dev]>=1; python_version >= "3.10"'], allow_direct_url=False)


PROBE_BACKEND = '''
import base64, hashlib, os, socket, zipfile

TARGET_PORT = {port}
SECRET = {secret!r}


def direct():
    try:
        socket.create_connection(("127.0.0.1", TARGET_PORT), timeout=3).close()
        return "connected"
    except OSError as exc:
        return "blocked: " + type(exc).__name__


def through_proxy(host, port):
    proxy = os.environ.get("HTTPS_PROXY", "")
    if not proxy:
        return "no proxy"
    proxy_host, proxy_port = proxy.rsplit("/", 1)[-1].rsplit(":", 1)
    with socket.create_connection((proxy_host, int(proxy_port)), timeout=10) as conn:
        conn.sendall(("CONNECT %s:%d HTTP/1.1\\r\\n\\r\\n" % (host, port)).encode())
        return conn.makefile("rb").readline().decode().strip()


def secret_seen():
    if any(SECRET in value for value in os.environ.values()):
        return "in os.environ"
    for pid in os.listdir("/proc"):
        for name in ("environ", "cmdline"):
            try:
                with open("/proc/%s/%s" % (pid, name), "rb") as handle:
                    if SECRET.encode() in handle.read():
                        return "in /proc/%s/%s" % (pid, name)
            except OSError:
                pass
    return "not found"


def probe():
    return {{
        "direct": direct(),
        "connect_loopback": through_proxy("127.0.0.1", TARGET_PORT),
        "connect_index_host_other_port": through_proxy("localhost", TARGET_PORT),
        "connect_other_host": through_proxy("pypi.org", 443),
        "secret": secret_seen(),
        "env": sorted(os.environ),
    }}


def get_requires_for_build_wheel(config_settings=None):
    return []


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    files = {{
        "spider_probe/__init__.py": "RESULTS = %r\\n" % (probe(),),
        "spider_probe-0.1.dist-info/METADATA": "Metadata-Version: 2.1\\nName: spider-probe\\nVersion: 0.1\\n",
        "spider_probe-0.1.dist-info/WHEEL": "Wheel-Version: 1.0\\nGenerator: probe\\nRoot-Is-Purelib: true\\nTag: py3-none-any\\n",
    }}
    name = "spider_probe-0.1-py3-none-any.whl"
    record = []
    with zipfile.ZipFile(os.path.join(wheel_directory, name), "w") as wheel:
        for path, text in files.items():
            data = text.encode()
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            wheel.writestr(path, data)
            record.append("%s,sha256=%s,%d" % (path, digest, len(data)))
        record.append("spider_probe-0.1.dist-info/RECORD,,")
        wheel.writestr("spider_probe-0.1.dist-info/RECORD", "\\n".join(record) + "\\n")
    return name
'''


def hostile_index(root: Path, target_port: int) -> Path:
    """A PEP 503 index holding one sdist, `spider-probe 0.1`, whose in-tree build backend probes
    the build jail while pip builds it and records what it found in the wheel it makes."""
    members = {
        "pyproject.toml": '[build-system]\nrequires = []\nbuild-backend = "probe_backend"\nbackend-path = ["."]\n',
        "probe_backend.py": PROBE_BACKEND.format(port=target_port, secret=JOB_SECRET),
        "PKG-INFO": "Metadata-Version: 2.1\nName: spider-probe\nVersion: 0.1\n",
    }
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as sdist:
        for name, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(f"spider_probe-0.1/{name}")
            info.size = len(data)
            sdist.addfile(info, io.BytesIO(data))
    archive = buffer.getvalue()
    (root / "files").mkdir(parents=True)
    (root / "files" / "spider_probe-0.1.tar.gz").write_bytes(archive)
    project = root / "simple" / "spider-probe"
    project.mkdir(parents=True)
    digest = hashlib.sha256(archive).hexdigest()
    link = f'<a href="../../files/spider_probe-0.1.tar.gz#sha256={digest}">spider_probe-0.1.tar.gz</a>'
    (project / "index.html").write_text(f"<!DOCTYPE html><html><body>{link}</body></html>")
    return root


def probe_results() -> str:
    import json

    import spider_probe

    return json.dumps(spider_probe.RESULTS)


def test_a_hostile_build_backend_reaches_nothing_but_the_index(redis_standin, tmp_path, monkeypatch):
    """The operator's index is a mirror on this host (`localhost`, allowed as an index host even
    though it is loopback). pip fetches the sdist through the build's proxy; its build backend
    then tries the stand-in for Redis on the same host, directly and through the proxy."""
    index = hostile_index(tmp_path / "index", redis_standin.port)
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(index)))
    server.RequestHandlerClass.log_message = lambda *args: None
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("PIP_INDEX_URL", f"http://localhost:{server.server_address[1]}/simple/")
    base, box = make_sandbox(Policy(package_index_hosts=("localhost",)))
    try:
        bundle = build_bundle(tools=[(probe_results, tool_spec(probe_results))])
        runtime = RuntimeConfig(packages=["spider-probe==0.1"], limits=LIMITS)
        opened = box.open_job("build-" + uuid.uuid4().hex[:8], bundle, runtime, {"JOB_TOKEN": JOB_SECRET})
        found = json.loads(call(opened, "probe_results"))
    finally:
        box.close()
        server.shutdown()
        shutil.rmtree(base, ignore_errors=True)
    assert found["direct"] == "blocked: ConnectionRefusedError"
    assert found["connect_loopback"].startswith("HTTP/1.1 403") and "not a package index host" in found["connect_loopback"]
    assert found["connect_index_host_other_port"].startswith("HTTP/1.1 403") and "is closed to dependency builds" in (
        found["connect_index_host_other_port"]
    )
    assert found["connect_other_host"].startswith("HTTP/1.1 403") and "pypi.org is not a package index host" in (
        found["connect_other_host"]
    )
    assert found["secret"] == "not found"
    assert "JOB_TOKEN" not in found["env"]
    assert redis_standin.accepted == 0


def test_a_package_from_pypi_builds_through_the_proxy(sandbox):
    """The default index hosts (pypi.org, files.pythonhosted.org) are what builds may reach."""
    bundle = build_bundle(tools=[(six_version, tool_spec(six_version))])
    opened = sandbox.open_job("pypi-" + uuid.uuid4().hex[:8], bundle, RuntimeConfig(packages=["six==1.16.0"], limits=LIMITS), {})
    try:
        assert call(opened, "six_version") == "1.16.0"
    finally:
        sandbox.close_job(opened.job_id)


def six_version() -> str:
    import six

    return six.__version__


def test_a_direct_url_requirement_never_reaches_pip(sandbox):
    bundle = build_bundle(tools=[(ping, tool_spec(ping))])
    runtime = RuntimeConfig(packages=["evil @ https://example.com/evil-1.0.tar.gz"], limits=LIMITS)
    with pytest.raises(SandboxError, match="names a direct URL"):
        sandbox.open_job("url-" + uuid.uuid4().hex[:8], bundle, runtime, {})
    assert not sandbox.venvs.path_for(runtime.packages).exists()

