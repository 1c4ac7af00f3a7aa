"""Outbound connections a job may make: public addresses only, unless the operator allows a host.

Every outbound connection made on a job's behalf (an OpenAI-compatible endpoint, jailed code with
`runtime.network`) is resolved here and refused when any address it resolves to is loopback,
private, link-local (cloud metadata services live there), multicast, reserved or unspecified.
The connection is then made to the checked address itself, so a name that resolves differently a
moment later (DNS rebinding) cannot slip through.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from typing import Any

from spider.errors import SpiderError

# Addresses of metadata services that are not in a private or link-local range everywhere.
METADATA_ADDRESSES = {ipaddress.ip_address("100.100.100.200"), ipaddress.ip_address("fd00:ec2::254")}
SHARED_ADDRESS_SPACE = ipaddress.ip_network("100.64.0.0/10")


class EgressDenied(SpiderError):
    """An outbound connection to an address the job may not reach."""


class UnresolvableHost(EgressDenied):
    """A host name that resolves to nothing (here and now: another machine's resolver may differ)."""


def forbidden_reason(address: str) -> str | None:
    """Why a job may not connect to `address` (an IP literal), or None when it may."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address"
    if ip.is_unspecified:
        return "an unspecified address"
    if ip.is_multicast:
        return "a multicast address"
    if isinstance(ip, ipaddress.IPv4Address) and ip in SHARED_ADDRESS_SPACE:
        return "a carrier-grade NAT address"
    if ip.is_private:
        return "a private address"
    if ip.is_reserved or not ip.is_global:
        return "a reserved address"
    return None


def resolve_allowed(host: str, port: int, allowed_hosts: tuple[str, ...] = ()) -> list[tuple[Any, ...]]:
    """The socket addresses (`getaddrinfo` entries) of `host:port` that a job may connect to.

    Raises EgressDenied when the host resolves to nothing, or to any address a job may not reach
    (all of them are checked: a name with one public and one private address is refused), unless
    the operator listed the host (by name or address) in `allowed_hosts`."""
    host = host.strip("[]").lower()
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise UnresolvableHost(f"cannot resolve host {host!r}: {exc}") from None
    if not infos:
        raise UnresolvableHost(f"host {host!r} resolves to no address")
    if host in allowed_hosts:
        return infos
    for info in infos:
        address = info[4][0]
        reason = forbidden_reason(address)
        if reason is not None and address.lower() not in allowed_hosts:
            raise EgressDenied(
                f"host {host!r} resolves to {address}, {reason}, which jobs may not reach; an operator can "
                f"allow it with SPIDER_ALLOWED_HOSTS={host}"
            )
    return infos


def connect_allowed(host: str, port: int, allowed_hosts: tuple[str, ...] = (), timeout: float | None = None) -> socket.socket:
    """A TCP connection to `host:port` through a checked address (the first that answers)."""
    last: OSError | None = None
    for family, kind, proto, _, address in resolve_allowed(host, port, allowed_hosts):
        sock = socket.socket(family, kind, proto)
        sock.settimeout(timeout)
        try:
            sock.connect(address)
            return sock
        except OSError as exc:
            sock.close()
            last = exc
    raise last or OSError(f"cannot connect to {host}:{port}")


def check_url(url: str, allowed_hosts: tuple[str, ...] = ()) -> None:
    """Raise EgressDenied unless `url` is http(s) to a host a job may reach."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise EgressDenied(f"{url!r} is not an http(s) URL with a host")
    resolve_allowed(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80), allowed_hosts)


def guarded_transport(allowed_hosts: tuple[str, ...], **kwargs: Any):
    """An httpx transport whose every connection goes through `resolve_allowed`: the checked
    address is the one connected to, while TLS still verifies the original host name."""
    import httpcore
    import httpx

    class GuardedBackend(httpcore.NetworkBackend):
        def __init__(self) -> None:
            self.inner = httpcore.SyncBackend()

        def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
            name = host.decode() if isinstance(host, bytes) else host
            infos = resolve_allowed(name, port, allowed_hosts)
            return self.inner.connect_tcp(infos[0][4][0], port, timeout, local_address, socket_options)

        def connect_unix_socket(self, path, timeout=None, socket_options=None):
            raise EgressDenied("jobs may not connect to unix sockets")

        def sleep(self, seconds: float) -> None:
            self.inner.sleep(seconds)

    transport = httpx.HTTPTransport(**kwargs)
    transport._pool = httpcore.ConnectionPool(**_pool_options(transport, kwargs.get("limits") or httpx.Limits()),
                                              network_backend=GuardedBackend())
    return transport


def _pool_options(transport: Any, limits: Any) -> dict[str, Any]:
    """The connection-pool settings of an httpx transport, to rebuild its pool around a guarded backend."""
    return {
        "ssl_context": transport._pool._ssl_context,
        "max_connections": limits.max_connections,
        "max_keepalive_connections": limits.max_keepalive_connections,
        "keepalive_expiry": limits.keepalive_expiry,
    }


class ResponseTooLarge(SpiderError):
    """A response body longer than the caller allows, or one sent compressed (which could inflate
    past any limit once decoded)."""


# The async clients whose transports share httpx's design, and their connection layers: the mcp
# SDK 2 speaks httpx2, the SDK 1 and the engines httpx.
ASYNC_HTTP_LIBRARIES = {"httpx": "httpcore", "httpx2": "httpcore2"}


def guarded_async_transport(
    allowed_hosts: tuple[str, ...],
    library: str = "httpx",
    max_response_bytes: int | None = None,
    on_refusal: Callable[[SpiderError], None] | None = None,
    **kwargs: Any,
):
    """The async twin of `guarded_transport`, for `library` httpx or httpx2: every connection goes
    through `resolve_allowed` (resolved in a worker thread, so the event loop keeps running) and
    is made to the checked address; unix sockets are refused. With `max_response_bytes`, a response
    body longer than that, or one with a Content-Encoding, fails with ResponseTooLarge while it
    arrives. `on_refusal` hears of each refusal before it is raised (a client that catches it can
    still say why it failed). Give the client `trust_env=False`: proxy variables would route
    around this transport."""
    import importlib

    def refuse(error: SpiderError) -> SpiderError:
        if on_refusal is not None:
            on_refusal(error)
        return error

    if library not in ASYNC_HTTP_LIBRARIES:
        raise ValueError(f"no guarded transport for {library!r}; one of {', '.join(ASYNC_HTTP_LIBRARIES)}")
    http = importlib.import_module(library)
    core = importlib.import_module(ASYNC_HTTP_LIBRARIES[library])

    class GuardedAsyncBackend(core.AsyncNetworkBackend):
        def __init__(self) -> None:
            self.inner = core.AnyIOBackend()

        async def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
            import anyio.to_thread

            name = host.decode() if isinstance(host, bytes) else host
            try:
                infos = await anyio.to_thread.run_sync(resolve_allowed, name, port, allowed_hosts)
            except EgressDenied as exc:
                raise refuse(exc) from None
            return await self.inner.connect_tcp(infos[0][4][0], port, timeout, local_address, socket_options)

        async def connect_unix_socket(self, path, timeout=None, socket_options=None):
            raise refuse(EgressDenied("jobs may not connect to unix sockets"))

        async def sleep(self, seconds: float) -> None:
            await self.inner.sleep(seconds)

    transport = http.AsyncHTTPTransport(**kwargs)
    transport._pool = core.AsyncConnectionPool(**_pool_options(transport, kwargs.get("limits") or http.Limits()),
                                               network_backend=GuardedAsyncBackend())
    if max_response_bytes is None:
        return transport

    class LimitedBody(http.AsyncByteStream):
        def __init__(self, inner: Any, url: Any) -> None:
            self.inner = inner
            self.url = url

        async def __aiter__(self):
            received = 0
            async for chunk in self.inner:
                received += len(chunk)
                if received > max_response_bytes:
                    raise refuse(ResponseTooLarge(f"the response of {self.url} is longer than {max_response_bytes} bytes"))
                yield chunk

        async def aclose(self) -> None:
            await self.inner.aclose()

    class LimitedTransport(http.AsyncBaseTransport):
        async def handle_async_request(self, request):
            response = await transport.handle_async_request(request)
            encoding = response.headers.get("content-encoding", "identity").strip().lower()
            if encoding not in ("", "identity"):
                await response.aclose()
                raise refuse(
                    ResponseTooLarge(
                        f"the response of {request.url} is compressed ({encoding}); only uncompressed answers are read, "
                        "so that their size is known"
                    )
                )
            return http.Response(
                status_code=response.status_code,
                headers=response.headers,
                stream=LimitedBody(response.stream, request.url),
                extensions=response.extensions,
            )

        async def aclose(self) -> None:
            await transport.aclose()

    return LimitedTransport()
