"""The program that runs inside the jail: it loads one job's bundle and serves calls over a pipe.

It is copied next to a copy of cloudpickle into the sandbox's runtime directory and started as
`python -I -S spider_jail.py` (from the job's dependency venv), so it may import nothing but the
standard library until the venv's site-packages are added. It never trusts the caller to be
anything but the sandbox worker, and the worker never trusts it: every answer is JSON, never pickle.

Frames are a 4-byte big-endian length and a document: from the worker, in `marshal` format (plain
data only, and fast: this side trusts the worker), to the worker, UTF-8 JSON (the worker trusts
nothing from here). The first frame from the worker is the start-up configuration (the fields of
spider.sandbox.interpreter.JailConfig, as a dict: this side cannot import it); the jail answers
with `{"ready": ...}` or `{"error": ...}` and then serves requests until its input closes:

* `{"op": "process", "which": "pre_processor"|"post_processor", "items": [...], "kwargs": {...}}`
  answered by one or more frames holding a list of outcomes (`["ok", value]`, `["drop"]`,
  `["error", kind, type, message, traceback]`, `["limit"]`) and a final `{"done": true, "recycle": bool}`;
* `{"op": "tool", "name": ..., "arguments": {...}}` answered by `{"content": str, ...}`,
  `{"error": [kind, type, message, traceback], ...}` or `{"limit": true, ...}`.

Every request carries `output_budget`: what its answer may cost (`answer_cost`) beyond the
`ROW_SLACK` each outcome and the closing frame get. The worker enforces it, killing the jail
over it; this side keeps within it, turning each result that does not fit into `["limit"]` (or
a tool's answer into `{"limit": true}`), so that honest code never meets that kill.

Before answering a request, every other process of the job in the jail is killed and reaped, so
no background process outlives the call that started it.

`spider_jail.py --mcp-server` is another mode: it starts one of the job's stdio MCP servers in the
jail, as the job's user (see run_mcp_server).

The source files of the user's local modules that travel in the bundle are served from memory by
an import finder, so that user functions may import those modules by name when they run.
"""

import json
import marshal
import os
import signal
import struct
import sys
import threading
import time

_LEN = struct.Struct(">I")
FLUSH_INTERVAL_S = 0.05
FLUSH_ITEMS = 2048
REAP_WAIT_S = 0.5  # well within the worker's grace period after a call
DROPPED = ["drop"]
OUTPUT_LIMITED = ["limit"]
MAX_ERROR_TEXT = 4000  # characters of an error's message, and of its traceback

# What an answer costs, in bytes: its JSON, plus what the objects that decoding it creates take
# in the worker beyond their characters (measured with CPython 3.11: a list or dict and its slot
# ~64 bytes, a str ~50 (two quotes), an int or float and its slot ~32-40). The worker charges
# answers this to runtime.limits.output_mb, so that the limit bounds the worker's memory however
# an answer is shaped: 3 MiB of `[[],[],...]` cost 67 MiB, 3 MiB of prose about 3.5 MiB.
CONTAINER_COST = 64
QUOTE_COST = 24
NUMBER_COST = 32
# Every outcome and every closing frame may cost this much without touching the budget: enough
# for `["drop"]`, `["limit"]`, its share of a frame's brackets, and `{"done": true, ...}`.
ROW_SLACK = 256
_DIGIT_OR_NOT = bytes(0x30 if 0x30 <= b <= 0x39 else 0x20 for b in range(256))
BUNDLE_MAGIC = b"SPIDERBUNDLE\x00"
BUNDLE_FORMAT = 2  # the layout spider.bundle.format writes: header, source files, payload


class CallTimeout(BaseException):
    """Raised in the user's code when a call runs past its wall-clock limit (not an Exception, so a
    bare `except Exception` in user code does not swallow it)."""


class CpuLimitExceeded(BaseException):
    """Raised in the user's code when a call uses more CPU time than its budget."""


def answer_cost(data):
    """The cost of the JSON `data` (bytes): its length, plus CONTAINER_COST for each `[` and `{`,
    QUOTE_COST for each `"` and NUMBER_COST for each number (a run of digits, NaN or Infinity).
    Counted with C-speed byte scans, before anything is decoded; characters inside strings count
    too, which only overestimates. Additive: the cost of `[a,b]` is that of `[`, `a`, `,`, `b`, `]`."""
    numbers = data.translate(_DIGIT_OR_NOT).count(b" 0") + data[:1].isdigit()
    numbers += data.count(b"NaN") + data.count(b"Infinity")
    containers = data.count(b"[") + data.count(b"{")
    return len(data) + CONTAINER_COST * containers + QUOTE_COST * data.count(b'"') + NUMBER_COST * numbers


def write_frame(fd, obj=None, raw=None):
    data = raw if raw is not None else json.dumps(obj).encode()
    view = memoryview(_LEN.pack(len(data)) + data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def read_exact(fd, size):
    chunks = []
    while size:
        chunk = os.read(fd, min(size, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def read_frame(fd):
    head = read_exact(fd, _LEN.size)
    if head is None:
        return None
    body = read_exact(fd, _LEN.unpack(head)[0])
    return None if body is None else marshal.loads(body)


class Guard:
    """Per-call wall-clock and CPU-time limits, enforced from inside the interpreter.

    A watchdog thread interrupts the main thread with SIGALRM when the current call is past its
    deadline; the kernel sends SIGXCPU when the call's CPU budget (an RLIMIT_CPU soft limit moved
    forward before every call) is spent. Both become exceptions in the user's code, so the
    interpreter survives. If user code defeats them, the worker's own deadline kills the jail."""

    def __init__(self, timeout_s, cpu_seconds):
        self.timeout_s = timeout_s
        self.cpu_seconds = cpu_seconds
        self.deadline = None
        self.main_thread = threading.main_thread().ident
        signal.signal(signal.SIGALRM, self._on_alarm)
        signal.signal(signal.SIGXCPU, self._on_xcpu)
        period = max(0.005, min(0.05, timeout_s / 10))
        thread = threading.Thread(target=self._watch, args=(period,), name="spider-watchdog", daemon=True)
        thread.start()

    def _watch(self, period):
        while True:
            time.sleep(period)
            deadline = self.deadline
            if deadline is not None and time.monotonic() > deadline:
                try:
                    signal.pthread_kill(self.main_thread, signal.SIGALRM)
                except OSError:
                    return

    def _on_alarm(self, signum, frame):
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise CallTimeout(f"the call ran longer than its limit of {self.timeout_s:g} s")

    def _on_xcpu(self, signum, frame):
        if self.deadline is not None:
            raise CpuLimitExceeded(f"the call used more than its CPU-time limit of {self.cpu_seconds} s")

    def budget_cpu(self, calls):
        """Move the CPU-time soft limit to `calls` call budgets from now (once per request: a
        batch of n rows may use n budgets in all, each row still has its own wall-clock limit)."""
        import resource

        try:
            soft, hard = resource.getrlimit(resource.RLIMIT_CPU)
            usage = resource.getrusage(resource.RUSAGE_SELF)
            want = int(usage.ru_utime + usage.ru_stime + self.cpu_seconds * max(calls, 1)) + 1
            if hard != resource.RLIM_INFINITY:
                want = min(want, hard)
            resource.setrlimit(resource.RLIMIT_CPU, (want, hard))
        except (ValueError, OSError):
            pass

    def call(self, func, *args, **kwargs):
        """Run one call of user code under the wall-clock limit."""
        self.deadline = time.monotonic() + self.timeout_s
        try:
            return func(*args, **kwargs)
        finally:
            self.deadline = None


def error_entry(exc, kind=None):
    import traceback

    if kind is None:
        if isinstance(exc, CallTimeout):
            kind = "timeout"
        elif isinstance(exc, CpuLimitExceeded):
            kind = "limit"
        elif isinstance(exc, MemoryError):
            kind = "limit"
        else:
            kind = "exception"
    frames = traceback.extract_tb(exc.__traceback__)
    # The frames of this file are the harness, not the user's code.
    frames = [f for f in frames if f.filename != __file__]
    tb = "".join(traceback.format_list(frames[-5:]))
    message = str(exc) if not isinstance(exc, MemoryError) else (str(exc) or "out of memory (memory limit reached)")
    return [kind, type(exc).__name__, message[:MAX_ERROR_TEXT], tb[-MAX_ERROR_TEXT:]]


class Server:
    def __init__(self, in_fd, out_fd, config, functions):
        self.in_fd = in_fd
        self.out_fd = out_fd
        self.config = config
        self.functions = functions
        self.guard = Guard(config["call_timeout_s"], config["cpu_seconds"])
        self.scratch = config["scratch"]
        self.reap = config.get("reap_others", False)
        self.output_left = None  # what the current request's answer may still cost (see answer_cost)

    def serve(self):
        while True:
            request = read_frame(self.in_fd)
            if request is None or request.get("op") == "exit":
                return
            op = request.get("op")
            self.output_left = request.get("output_budget")
            if op == "process":
                final = self.process(request)
            elif op == "tool":
                final = self.tool(request)
            else:
                final = {"error": ["protocol", "ValueError", f"unknown op {op!r}", ""]}
            # Clean up before answering: once the worker has the answer, nothing of the call runs.
            # If something could not be cleared in time, the worker replaces the whole jail.
            if not self.after_call():
                final["recycle"] = True
            data = json.dumps(final).encode()
            if not self.fits(data, 1):  # only a tool's answer can be this large
                data = json.dumps({"limit": True, "recycle": bool(final.get("recycle"))}).encode()
            write_frame(self.out_fd, raw=data)

    def fits(self, data, outcomes):
        """Whether the frame `data`, holding `outcomes` outcomes (1 for a closing frame), fits in
        what is left of the request's budget; if it does, it is taken from the budget."""
        if self.output_left is None:
            return True
        charge = answer_cost(data) - ROW_SLACK * outcomes
        if charge > self.output_left:
            return False
        self.output_left -= max(0, charge)
        return True

    def after_call(self):
        """Kill every other process of this job in the jail (background processes, fork bombs)
        and wait until they are gone, then return to the scratch directory. False when some
        process could not be cleared within REAP_WAIT_S."""
        cleared = True
        if self.reap:
            cleared = False
            deadline = time.monotonic() + REAP_WAIT_S
            while time.monotonic() < deadline:
                try:
                    os.kill(-1, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    cleared = True  # nothing left that this user may signal
                    break
                self.reap_children()
                time.sleep(0.001)
        self.reap_children()
        try:
            os.chdir(self.scratch)
        except OSError:
            pass
        return cleared

    @staticmethod
    def reap_children():
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return

    def process(self, request):
        func = self.functions.get(request["which"])
        kwargs = request.get("kwargs") or {}
        items = request["items"]
        self.guard.budget_cpu(len(items))
        outcomes = []
        last_flush = time.monotonic()
        recycle = False
        for item in items:
            try:
                value = self.guard.call(func, item, **kwargs)
            except BaseException as exc:  # user code may raise anything, even SystemExit
                recycle = recycle or isinstance(exc, (MemoryError, CpuLimitExceeded))
                outcomes.append(["error", *error_entry(exc)])
            else:
                outcomes.append(DROPPED if value is None else ["ok", value])
            if len(outcomes) >= FLUSH_ITEMS or time.monotonic() - last_flush >= FLUSH_INTERVAL_S:
                self.send_outcomes(outcomes)
                outcomes, last_flush = [], time.monotonic()
        if outcomes:
            self.send_outcomes(outcomes)
        return {"done": True, "recycle": recycle}

    def send_outcomes(self, outcomes):
        try:
            data = json.dumps(outcomes).encode()
        except Exception:  # some value is not JSON: find which, and make those errors
            data = None
        if data is None or not self.fits(data, len(outcomes)):
            # `[x]` is `[` + x + `]`: a lone outcome need not be encoded again.
            data = self.fitted_outcomes(outcomes, [data[1:-1]] if data and len(outcomes) == 1 else None)
        write_frame(self.out_fd, raw=data)

    def fitted_outcomes(self, outcomes, encoded=None):
        """A frame of `outcomes` (or of their JSON, `encoded`) one by one: a value that is not
        JSON becomes an error, one that does not fit in what is left of the budget becomes
        `["limit"]` (which always fits, as each outcome has ROW_SLACK); the frame's cost is taken
        from the budget."""
        limited = json.dumps(OUTPUT_LIMITED).encode()
        parts = []
        spent = answer_cost(b"[]") - answer_cost(b",")  # the brackets; the first part has no comma
        for index, outcome in enumerate(outcomes):
            try:
                part = encoded[index] if encoded else json.dumps(outcome).encode()
            except Exception as exc:
                message = (
                    f"the processor returned a {type(outcome[1]).__name__} that is not JSON data ({exc}); "
                    "return dicts, lists, strings, numbers, booleans or None"
                )
                part = json.dumps(["error", "exception", "TypeError", message, ""]).encode()
            charge = answer_cost(part) + answer_cost(b",") - ROW_SLACK
            if self.output_left is not None and spent + charge > self.output_left:
                part, charge = limited, answer_cost(limited) + answer_cost(b",") - ROW_SLACK
            parts.append(part)
            spent += charge
        if self.output_left is not None:
            self.output_left -= max(0, spent)
        return b"[" + b",".join(parts) + b"]"

    def tool(self, request):
        entry = self.functions["tools"].get(request["name"])
        if entry is None:
            return {"error": ["exception", "KeyError", f"no tool named {request['name']!r}", ""]}
        func, fixed = entry
        arguments = request.get("arguments")
        if not isinstance(arguments, dict):
            return {"error": ["exception", "TypeError", "tool arguments must be a JSON object", ""]}
        try:
            self.guard.budget_cpu(1)
            result = self.guard.call(func, **{**arguments, **fixed})
            if isinstance(result, str):
                content = result
            else:
                try:
                    content = json.dumps(result)
                except (TypeError, ValueError) as exc:
                    raise TypeError(
                        f"the tool returned a {type(result).__name__}, which is not JSON data ({exc}); "
                        "return a string or JSON-serializable data"
                    ) from None
            answer = {"content": content}
        except BaseException as exc:
            answer = {"error": error_entry(exc), "recycle": isinstance(exc, (MemoryError, CpuLimitExceeded))}
        return answer


def become_job_user(config):
    """Switch to the job's user, into its scratch dir, and only then take its environment
    (firejail's own variables go; the job's may name LD_PRELOAD & co., harmless from here on)."""
    if config.get("uid") is not None:
        drop_privileges(config["uid"], config["gid"])
    os.chdir(config["scratch"])
    os.environ.clear()
    os.environ.update(config["env"])


def drop_privileges(uid, gid):
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    if os.getuid() != uid or os.geteuid() != uid:
        raise RuntimeError("could not switch to the job's user")
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("CapEff:") and int(line.split()[1], 16) != 0:
                raise RuntimeError("capabilities are still held after switching user")


class ShippedModules:
    """An import finder and loader for the user's local modules whose sources travelled in the
    bundle (`{name: {"package": bool, "source": str}}`), under their original names.

    It goes before the path finder, as those files came before installed packages on the client's
    `sys.path`. Tracebacks show the modules' lines through `get_source`."""

    def __init__(self, modules):
        self.modules = modules

    def filename(self, name):
        return name.replace(".", "/") + ("/__init__.py" if self.modules[name]["package"] else ".py")

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.modules:
            return None
        import importlib.util

        spec = importlib.util.spec_from_loader(
            fullname, self, origin=self.filename(fullname), is_package=self.modules[fullname]["package"]
        )
        spec.has_location = True  # so that the module has a __file__, as on the client
        return spec

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        name = module.__spec__.name
        exec(compile(self.modules[name]["source"], self.filename(name), "exec", dont_inherit=True), module.__dict__)

    def get_source(self, fullname):
        return self.modules[fullname]["source"]

    def is_package(self, fullname):
        return self.modules[fullname]["package"]

    def install(self):
        """Serve imports from now on, after the builtin and frozen modules, before the path finder."""
        from importlib.machinery import PathFinder

        finders = sys.meta_path
        finders.insert(finders.index(PathFinder) if PathFinder in finders else len(finders), self)


def load_bundle(path):
    """The user's functions from a bundle file, after making its local modules importable."""
    with open(path, "rb") as handle:
        data = handle.read()
    if not data.startswith(BUNDLE_MAGIC):
        raise ValueError("not a Spider bundle")
    start = len(BUNDLE_MAGIC) + _LEN.size
    (header_len,) = _LEN.unpack_from(data, len(BUNDLE_MAGIC))
    header = json.loads(data[start : start + header_len])
    if header.get("format") != BUNDLE_FORMAT:
        raise RuntimeError(
            f"the bundle has format {header.get('format')!r}, but this sandbox reads only format {BUNDLE_FORMAT}: "
            "the client's and the server's Spider versions differ"
        )
    wanted = ".".join(header["python"].split(".")[:2])
    here = "%d.%d" % sys.version_info[:2]
    if wanted != here:
        raise RuntimeError(f"the bundle was built with Python {wanted} but the sandbox runs Python {here}")
    body = data[start + header_len :]
    sources, payload = body[: header["sources_bytes"]], body[header["sources_bytes"] :]
    import pickle
    import resource  # noqa: F401  (this harness's own imports must never find the user's files)
    import traceback  # noqa: F401

    import cloudpickle  # noqa: F401  (registers the reducers the payload refers to)

    ShippedModules(json.loads(sources)).install()
    return pickle.loads(payload)


PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


def start_egress_relay(socket_path):
    """Listen on 127.0.0.1 of the jail's own network namespace (where nothing of the host is) and
    pipe every connection to the worker's egress proxy through the unix socket `socket_path`.
    Returns the port. The relay grants nothing: the proxy on the other end checks every target."""
    import socket

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)

    def splice(source, target):
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                target.sendall(data)
        except OSError:
            pass
        try:
            target.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def relay(client):
        proxy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            proxy.connect(socket_path)
            back = threading.Thread(target=splice, args=(proxy, client), daemon=True)
            back.start()
            splice(client, proxy)
            back.join()
        except OSError:
            pass
        finally:
            client.close()
            proxy.close()

    def accept():
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # out of descriptors, for now
                time.sleep(0.05)
                continue
            threading.Thread(target=relay, args=(client,), name="spider-egress-relay", daemon=True).start()

    threading.Thread(target=accept, name="spider-egress-relay", daemon=True).start()
    return listener.getsockname()[1]


def use_egress_proxy(socket_path):
    """Start the relay and point the proxy variables that HTTP clients (requests, httpx, urllib,
    pip, curl) read at it; the jail has no other way out. A NO_PROXY of the job's own runtime.env
    stays: what it names is reached directly, which leads no further than the jail's own loopback."""
    proxy = "http://127.0.0.1:%d" % start_egress_relay(socket_path)
    for name in PROXY_VARIABLES:
        os.environ[name] = proxy


def run_behind_relay(socket_path, command):
    """`spider_jail.py --egress-relay SOCKET -- COMMAND...`: run COMMAND (a dependency build) with
    the relay in front of the egress proxy; exit with its status."""
    import subprocess

    use_egress_proxy(socket_path)
    try:
        return subprocess.call(command)
    except OSError as exc:
        print("cannot run %s: %s" % (command[0], exc), file=sys.stderr)
        return 127


def run_mcp_server():
    """`spider_jail.py --mcp-server`: start one of the job's stdio MCP servers.

    Two frames come first on stdin: the start-up configuration (as for an interpreter) and the
    server's `{"command": [...], "env": {...}}`. As the job's user, in its scratch dir, with its
    environment and venv (and the relay to the egress proxy for `runtime.network`), the harness
    answers `{"ready": ...}` or `{"error": ...}` on stdout, then runs the command with stdin and
    stdout as the MCP transport: newline-delimited JSON-RPC from then on, nothing of the harness's.
    Without network the command replaces the harness; with it, the relay's threads live here, so
    the command runs as a child and its exit status is the harness's."""
    config = read_frame(0)
    server = read_frame(0) if config is not None else None
    if server is None:
        return 2
    try:
        become_job_user(config)
        os.environ.update(server["env"])
        os.environ["VIRTUAL_ENV"] = config["venv"]
        import shutil

        command = list(server["command"])
        program = shutil.which(command[0], path=os.environ.get("PATH", ""))
        if program is None:
            raise FileNotFoundError(
                "the MCP server's command %r is not in the job's venv or on the system's PATH; add the package "
                "that provides it to runtime.packages" % command[0]
            )
        if config.get("egress_socket"):
            use_egress_proxy(config["egress_socket"])
    except BaseException as exc:
        write_frame(1, {"error": error_entry(exc, kind="load")})
        return 1
    write_frame(1, {"ready": True, "pid": os.getpid(), "uid": os.getuid()})
    if not config.get("egress_socket"):
        os.execv(program, [program] + command[1:])
    import subprocess

    return subprocess.call([program] + command[1:])


def main():
    if sys.argv[1:2] == ["--egress-relay"] and sys.argv[3:4] == ["--"]:
        return run_behind_relay(sys.argv[2], sys.argv[4:])
    if sys.argv[1:] == ["--mcp-server"]:
        return run_mcp_server()
    # The pipe to the worker gets private descriptors; the user's prints go to stderr instead.
    in_fd = os.dup(0)
    out_fd = os.dup(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    config = read_frame(in_fd)
    if config is None:
        return 2
    try:
        become_job_user(config)
        if config.get("egress_socket"):
            use_egress_proxy(config["egress_socket"])
        sys.executable = os.path.join(config["venv"], "bin", "python")
        import site

        site.main()
        sys.path.insert(0, config["runtime_dir"])
        functions = load_bundle(config["bundle"])
    except BaseException as exc:
        write_frame(out_fd, {"error": error_entry(exc, kind="load")})
        return 1
    write_frame(
        out_fd,
        {
            "ready": True,
            "pid": os.getpid(),
            "python": "%d.%d.%d" % sys.version_info[:3],
            "tools": sorted(functions["tools"]),
        },
    )
    Server(in_fd, out_fd, config, functions).serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
