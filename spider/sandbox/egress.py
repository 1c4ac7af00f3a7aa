"""The egress proxy: the only way out of a jail, for jobs with `runtime.network` and for
dependency builds.

A jail keeps an empty network namespace of its own (loopback only). Its harness relays every TCP
connection made to a port on its loopback to this proxy, which runs in the worker and listens on a
unix socket that only that jail can see. The proxy speaks HTTP CONNECT (any TCP protocol, TLS
included) and absolute-form plain HTTP (`GET http://host/path`), checks the target with
spider.netpolicy (public addresses only, unless the operator allows a host) and connects to the
checked address itself, so that name resolution happens here, once. A refused target gets a
403 whose status line and body say why.
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from spider.errors import SandboxError
from spider.netpolicy import EgressDenied, connect_allowed
from spider.policy import Policy, default_index_hosts

log = logging.getLogger("spider.sandbox")

MAX_HEAD_BYTES = 64 * 1024
HEAD_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 10.0
IDLE_TIMEOUT_S = 300.0
MAX_CONNECTIONS = 64
# sockaddr_un holds 108 bytes, the terminating NUL included.
MAX_SOCKET_PATH = 107
# Request and response headers that concern one hop only; the proxy sets its own Connection.
HOP_HEADERS = {b"connection", b"keep-alive", b"proxy-connection", b"proxy-authorization", b"proxy-authenticate"}


class BadRequest(Exception):
    """The client did not send a proxy request this proxy serves."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class EgressRules:
    """Which targets a jail may reach.

    `allowed_hosts`: hosts (names or addresses) reachable even at loopback, private or link-local
    addresses. `only_hosts`: when set, nothing but these hosts, and only on `only_ports` (a
    dependency build reaches the package index and nothing else)."""

    allowed_hosts: tuple[str, ...] = ()
    only_hosts: tuple[str, ...] | None = None
    only_ports: tuple[int, ...] = ()

    @classmethod
    def for_jobs(cls, policy: Policy) -> "EgressRules":
        """Jobs with `runtime.network`: public addresses, and the operator's `allowed_hosts`."""
        return cls(allowed_hosts=policy.allowed_hosts)

    @classmethod
    def for_builds(cls, policy: Policy) -> "EgressRules":
        """Dependency builds: the package index hosts only (on 443, 80 and the ports the index
        URLs name), wherever they resolve to, as the operator's mirror may be private."""
        hosts = tuple(policy.package_index_hosts) or default_index_hosts()
        return cls(allowed_hosts=hosts, only_hosts=hosts, only_ports=tuple(sorted({80, 443, *index_url_ports()})))

    def connect(self, host: str, port: int, timeout: float = CONNECT_TIMEOUT_S) -> socket.socket:
        """A connection to `host:port` through a checked address; EgressDenied when refused."""
        host = host.strip("[]").lower()
        if self.only_hosts is not None:
            if host not in self.only_hosts:
                listed = ", ".join(self.only_hosts) or "none"
                raise EgressDenied(
                    f"{host} is not a package index host; dependency builds may reach only {listed} "
                    "(an operator sets them with SPIDER_PACKAGE_INDEX_HOSTS)"
                )
            if port not in self.only_ports:
                ports = ", ".join(map(str, self.only_ports))
                raise EgressDenied(
                    f"port {port} of {host} is closed to dependency builds (open: {ports}, and the ports of "
                    "PIP_INDEX_URL / PIP_EXTRA_INDEX_URL)"
                )
        return connect_allowed(host, port, self.allowed_hosts, timeout=timeout)


def index_url_ports() -> set[int]:
    """The explicit ports of the worker's PIP_INDEX_URL and PIP_EXTRA_INDEX_URL."""
    ports = set()
    for name in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL"):
        for url in os.environ.get(name, "").split():
            try:
                port = urlsplit(url).port
            except ValueError:
                continue
            if port:
                ports.add(port)
    return ports


class EgressProxy:
    """One jail's (or one job's jails') egress proxy on the unix socket `socket_path`.

    The socket is made the property of `owner` (the job's user) with mode 0600, so that no other
    user of the host may use it; the jail sees it because its directory is whitelisted into the
    jail. Start with `start()` (or `with`), stop with `close()`, which also ends open connections."""

    def __init__(
        self,
        socket_path: Path,
        rules: EgressRules,
        owner: int | None = None,
        name: str = "",
        max_connections: int = MAX_CONNECTIONS,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
    ):
        if len(os.fsencode(socket_path)) > MAX_SOCKET_PATH:
            raise SandboxError(
                f"the egress socket path {socket_path} is longer than {MAX_SOCKET_PATH} bytes, the most a unix "
                "socket may have; pick a shorter sandbox root (SPIDER_SANDBOX_DIR)"
            )
        self.socket_path = Path(socket_path)
        self.rules = rules
        self.owner = owner
        self.name = name or self.socket_path.parent.name
        self.idle_timeout_s = idle_timeout_s
        self.max_connections = max_connections
        self._slots = threading.BoundedSemaphore(max_connections)
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._listener: socket.socket | None = None
        self._wake_r, self._wake_w = os.pipe()
        self._thread: threading.Thread | None = None

    def start(self) -> "EgressProxy":
        self.socket_path.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.socket_path))
        os.chmod(self.socket_path, 0o600)
        if self.owner is not None:
            os.chown(self.socket_path, self.owner, self.owner)
        listener.listen(128)
        self._listener = listener
        self._thread = threading.Thread(target=self._accept_loop, name=f"spider-egress-{self.name}", daemon=True)
        self._thread.start()
        return self

    def __enter__(self) -> "EgressProxy":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop accepting, end every open connection, remove the socket. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            connections, self._open = list(self._open), set()
        os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(timeout=5)
        for connection in connections:  # wakes its serving thread, which closes it
            _shutdown(connection)
        os.close(self._wake_r)
        os.close(self._wake_w)
        self.socket_path.unlink(missing_ok=True)

    # -- connections ------------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._listener is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self._listener, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while not self._closed:
                ready = {key.fd for key, _ in selector.select()}
                if self._wake_r in ready:
                    break
                try:
                    client, _ = self._listener.accept()
                except OSError:  # out of descriptors: the client will retry
                    continue
                if not self._slots.acquire(blocking=False):
                    _reply(client, 503, f"too many open connections (at most {self.max_connections})")
                    _close(client)
                    continue
                threading.Thread(target=self._serve, args=(client,), name=f"spider-egress-{self.name}", daemon=True).start()
        _close(self._listener)

    def _track(self, sock: socket.socket) -> bool:
        with self._lock:
            if self._closed:
                return False
            self._open.add(sock)
            return True

    def _serve(self, client: socket.socket) -> None:
        upstream = None
        try:
            if not self._track(client):
                return
            client.settimeout(HEAD_TIMEOUT_S)
            try:
                head, rest = _read_head(client)
                request = parse_request(head)
            except BadRequest as exc:
                _reply(client, exc.status, str(exc))
                return
            try:
                upstream = self.rules.connect(request.host, request.port)
            except EgressDenied as exc:
                log.info("egress of %s refused: %s", self.name, exc)
                _reply(client, 403, str(exc))
                return
            except OSError as exc:
                _reply(client, 502, f"cannot connect to {request.host}:{request.port}: {exc}")
                return
            if not self._track(upstream):
                return
            if request.method == b"CONNECT":
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:
                upstream.sendall(request.forward_head)
            if rest:
                upstream.sendall(rest)
            _pipe(client, upstream, self.idle_timeout_s, rewrite_response_head=request.method != b"CONNECT")
        except OSError:
            pass  # a peer went away, or the proxy closed
        finally:
            for sock in (client, upstream):
                if sock is not None:
                    with self._lock:
                        self._open.discard(sock)
                    _close(sock)
            self._slots.release()


@dataclass
class ProxyRequest:
    method: bytes
    host: str
    port: int
    forward_head: bytes = b""  # plain HTTP: the request head as the origin server gets it


def parse_request(head: bytes) -> ProxyRequest:
    """The target of a proxy request head (request line and headers, CRLF-separated)."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        raise BadRequest(400, "not an HTTP/1.x request")
    method, target, version = parts
    try:
        text = target.decode("ascii")
    except UnicodeDecodeError:
        raise BadRequest(400, "the request target is not ASCII") from None
    if method == b"CONNECT":
        try:
            where = urlsplit("//" + text)
            host, port = where.hostname, where.port
        except ValueError:
            raise BadRequest(400, f"CONNECT needs host:port, not {text!r}") from None
        if not host or port is None or where.username is not None or where.path:
            raise BadRequest(400, f"CONNECT needs host:port, not {text!r}")
        return ProxyRequest(method, host, port)
    try:
        url = urlsplit(text)
        host, port = url.hostname, url.port or 80
    except ValueError:
        raise BadRequest(400, f"bad request target {text!r}") from None
    if url.scheme != "http" or not host or url.username is not None:
        raise BadRequest(
            400,
            "this is an HTTP proxy: send CONNECT host:port (https and other protocols) or an absolute "
            f"http:// URL, not {text[:200]!r}",
        )
    path = (url.path or "/") + (f"?{url.query}" if url.query else "")
    headers = [line for line in lines[1:] if line and line.split(b":", 1)[0].strip().lower() not in HOP_HEADERS]
    if not any(line.split(b":", 1)[0].strip().lower() == b"host" for line in headers):
        headers.insert(0, b"Host: " + url.netloc.encode())
    forward = b"\r\n".join([b" ".join([method, path.encode(), version]), *headers, b"Connection: close", b"", b""])
    return ProxyRequest(method, host, port, forward)


def _read_head(client: socket.socket) -> tuple[bytes, bytes]:
    """The request head (without its final blank line) and whatever the client sent after it."""
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        if len(buffer) > MAX_HEAD_BYTES:
            raise BadRequest(431, f"the request head is longer than {MAX_HEAD_BYTES} bytes")
        chunk = client.recv(65536)
        if not chunk:
            raise BadRequest(400, "the connection closed before a complete request head")
        buffer += chunk
    head, rest = buffer.split(b"\r\n\r\n", 1)
    return head, rest


def _pipe(client: socket.socket, upstream: socket.socket, idle_timeout_s: float, rewrite_response_head: bool) -> None:
    """Copy bytes both ways until both sides are done or nothing moves for `idle_timeout_s`.

    For plain HTTP the first response head gets `Connection: close`, so that the client does not
    send a request for another host down a connection that leads to this one."""
    peers = {client: upstream, upstream: client}
    head = bytearray() if rewrite_response_head else None
    for sock in peers:
        sock.settimeout(idle_timeout_s)  # bounds sendall to a peer that stopped reading
    with selectors.DefaultSelector() as selector:
        for sock in peers:
            selector.register(sock, selectors.EVENT_READ)
        reading = set(peers)
        while reading:
            events = selector.select(timeout=idle_timeout_s)
            if not events:
                return
            for key, _ in events:
                source = key.fileobj
                target = peers[source]
                data = source.recv(65536)
                if not data:
                    selector.unregister(source)
                    reading.discard(source)
                    if head:  # a response that ended inside its head: pass on what came
                        target.sendall(bytes(head))
                        head = None
                    _shutdown_write(target)
                    continue
                if source is upstream and head is not None:
                    head += data
                    data, head = _rewrite_response_head(head)
                    if not data:
                        continue
                target.sendall(data)


def _rewrite_response_head(buffer: bytearray) -> tuple[bytes, bytearray | None]:
    """What to send on once `buffer` holds a complete response head (with `Connection: close`),
    and the buffer to keep (None once the final response head has gone by)."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        if len(buffer) > MAX_HEAD_BYTES:
            return bytes(buffer), None
        return b"", buffer
    lines = bytes(buffer[:end]).split(b"\r\n")
    rest = bytes(buffer[end + 4 :])
    if lines[0][9:10] == b"1":  # an interim response (100 Continue): the real head is still to come
        sent, keep = _rewrite_response_head(bytearray(rest))
        return bytes(buffer[: end + 4]) + sent, keep
    headers = [line for line in lines[1:] if line.split(b":", 1)[0].strip().lower() not in HOP_HEADERS]
    return b"\r\n".join([lines[0], *headers, b"Connection: close", b"", b""]) + rest, None


def _reply(client: socket.socket, status: int, reason: str) -> None:
    """An error answer whose status line carries the reason too (clients show it for CONNECT)."""
    title = {400: "Bad Request", 403: "Forbidden", 431: "Request Header Fields Too Large", 502: "Bad Gateway",
             503: "Service Unavailable"}.get(status, "Error")  # fmt: skip
    line = "".join(c if c.isprintable() and c.isascii() else "?" for c in reason)[:300]
    body = f"Spider egress proxy: {reason}\n".encode(errors="replace")
    answer = (
        f"HTTP/1.1 {status} {title}: {line}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body
    try:
        client.settimeout(5)
        client.sendall(answer)
    except OSError:
        pass


def _shutdown_write(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _close(sock: socket.socket) -> None:
    _shutdown(sock)
    sock.close()
