"""A small MCP server for the tests, built with the SDK's FastMCP (MCPServer in mcp 2): stdio by
default, streamable HTTP on 127.0.0.1 with `--http PORT`.

Its tools show where it runs: `whoami` reports the process's user, host name, working directory
and environment; `connect` tries a TCP connection and `fetch` an HTTP GET; `fail` raises; `hang`
never returns; `shout` answers as long as asked.
"""

import os
import socket
import sys

try:
    from mcp.server.mcpserver import MCPServer as FastMCP
except ImportError:  # mcp 1.x
    from mcp.server.fastmcp import FastMCP

server = FastMCP("toolbox")


@server.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@server.tool()
def whoami() -> dict:
    """Who and where this server runs."""
    return {
        "uid": os.getuid(),
        "gid": os.getgid(),
        "hostname": socket.gethostname(),
        "cwd": os.getcwd(),
        "env": dict(os.environ),
        "pid": os.getpid(),
        "python": sys.executable,
    }


@server.tool()
def connect(host: str, port: int) -> str:
    """Open a TCP connection to host:port and say whether it worked."""
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as exc:
        return f"blocked: {type(exc).__name__}: {exc}"
    return "connected"


@server.tool()
def fetch(url: str) -> str:
    """GET a URL with urllib (which honours the proxy variables) and return its body."""
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.read().decode()
    except OSError as exc:
        return f"blocked: {type(exc).__name__}: {exc}"


@server.tool()
def fail(message: str) -> str:
    """Raise an error with this message."""
    raise ValueError(message)


@server.tool()
async def hang() -> str:
    """Never answer (asleep without blocking the server, which keeps serving other calls)."""
    import asyncio

    await asyncio.sleep(3600)
    return "woke up"


@server.tool()
def shout(text: str, times: int = 1) -> str:
    """Upper-case text, repeated."""
    return text.upper() * times


if __name__ == "__main__":
    if sys.argv[1:2] == ["--http"]:
        import uvicorn

        uvicorn.run(server.streamable_http_app(), host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
    else:
        server.run()
