"""What a jail sends back cannot hurt the sandbox worker: its memory stays within a small multiple
of the job's runtime.limits.output_mb, and no answer, however forged, fails more than its own row
or tool call, or leaves the job's pool short of an interpreter.

Everything is real: firejail, the jailed interpreters, and user code that finds the pipe to the
worker and writes to it whatever it likes. The worker is this test process; its memory is
measured with psutil while each attack runs.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
import tracemalloc
import uuid
from pathlib import Path

import psutil
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spider.bundle import build_bundle, tool_spec
from spider.config import RuntimeConfig, SandboxLimits
from spider.errors import SandboxError
from spider.sandbox import Sandbox
from spider.sandbox.jailed import ROW_SLACK, answer_cost

MIB = 1024 * 1024
OUTPUT_MB = 16
LIMITS = SandboxLimits(memory_mb=1024, call_timeout_s=5.0, cpu_seconds=30, output_mb=OUTPUT_MB)
# The decoded answers of a request take about 1.1x output_mb, reading a frame adds up to 2x
# (its bytes and its text); the rest is room for the allocator and the test's own objects.
WORKER_GROWTH_LIMIT = 4 * OUTPUT_MB * MIB

needs_firejail = pytest.mark.usefixtures("firejail")


# -- hostile user code (shipped by value into the jail) ----------------------------------------


def send_to_worker(header_size: int, body: bytes) -> None:
    """Write a frame straight to the pipe to the worker, found the way hostile code would: the
    one writable pipe that is not stderr. Then wait to be killed."""
    import fcntl
    import os
    import stat
    import struct
    import time

    stderr = os.fstat(2).st_ino
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            info = os.fstat(fd)
            writable = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_WRONLY
        except OSError:
            continue
        if stat.S_ISFIFO(info.st_mode) and info.st_ino != stderr and writable:
            view = memoryview(struct.pack(">I", header_size) + body)
            while view:
                view = view[os.write(fd, view) :]
            time.sleep(60)
    raise RuntimeError("no pipe to the worker")


def forged(attack: str) -> None:
    """The frames of the attacks, each cheap for the jail to make."""
    if attack == "huge-header":  # announces 400 MiB (the protocol's own ceiling is 512 MiB)
        send_to_worker(400 * 1024 * 1024, b"[" * (1024 * 1024))
    elif attack == "empty-lists":  # 3 MiB of [[],[],...]: a million lists, well under output_mb
        body = b"[" + b",".join([b"[]"] * (1024 * 1024)) + b"]"
        send_to_worker(len(body), body)
    elif attack == "deep":  # too deep for any recursive decoder
        body = b"[" * 100_000 + b"]" * 100_000
        send_to_worker(len(body), body)
    elif attack == "not-json":
        send_to_worker(11, b"\xff\xfe not json")
    elif attack == "garbage":  # decodes, as a frame of three outcomes of the wrong shapes
        deep_value = "[" * 200 + "]" * 200
        body = f'[["ok", {deep_value}], ["error", "exception", "E", "{"m" * 1_000_000}"], ["ok"]]'.encode()
        send_to_worker(len(body), body)


def hostile_row(row):
    if row.get("attack"):
        forged(row["attack"])
    return row


def forging_tool(attack: str) -> str:
    forged(attack)
    return "not reached"


def ping() -> str:
    return "pong"


def nap(seconds: float) -> str:
    import time

    time.sleep(seconds)
    return "rested"


def big_answer(mib: int) -> str:
    return "x" * (mib * 1024 * 1024)


def big_record(record):
    import time

    time.sleep(0.06)  # past the jail's flush interval: one frame per record
    return {"i": record["i"], "text": "x" * (record["mib"] * 1024 * 1024)}


TOOLS = [forging_tool, ping, nap, big_answer]


# -- measuring the worker ----------------------------------------------------------------------


class PeakRSS:
    """The most this process's resident memory grew while the block ran (sampled every 2 ms)."""

    def __enter__(self) -> "PeakRSS":
        self._process = psutil.Process()
        self.baseline = self._process.memory_info().rss
        self.peak = self.baseline
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._sampler.join()
        self.peak = max(self.peak, self._process.memory_info().rss)

    @property
    def growth(self) -> int:
        return self.peak - self.baseline


def within(seconds: float, call):
    """`call()`'s result, failing the test instead of hanging when it takes longer."""
    result: list = []
    thread = threading.Thread(target=lambda: result.append(call()), daemon=True)
    thread.start()
    thread.join(seconds)
    assert result, f"the call was still blocked after {seconds} s"
    return result[0]


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sandbox():
    base = Path(tempfile.mkdtemp(prefix="spider-output-test-", dir="/tmp"))
    base.chmod(0o755)
    box = Sandbox(base / "root", pool_size=1)  # one interpreter per job: a leaked slot blocks the next call
    yield box
    box.close()
    shutil.rmtree(base, ignore_errors=True)


def open_job(sandbox, limits=LIMITS, **bundle_args):
    bundle = build_bundle(tools=[(f, tool_spec(f)) for f in TOOLS], **bundle_args)
    return sandbox.open_job(f"out-{uuid.uuid4().hex[:8]}", bundle, RuntimeConfig(limits=limits))


@pytest.fixture()
def job(sandbox):
    job = open_job(sandbox, pre_processor=hostile_row, post_processor=big_record)
    yield job
    sandbox.close_job(job.job_id)


def assert_output_limit(error) -> None:
    assert error.kind == "limit" and error.type == "OutputLimit", error
    assert f"runtime.limits.output_mb ({OUTPUT_MB} MiB)" in error.message


# -- forged frames from a processor ------------------------------------------------------------


@needs_firejail
@pytest.mark.parametrize("attack", ["huge-header", "empty-lists"])
def test_a_forged_frame_over_output_mb_fails_its_row_and_costs_the_worker_little(job, attack):
    rows = [{"i": 0}, {"i": 1, "attack": attack}, {"i": 2}]
    started = time.monotonic()
    with PeakRSS() as rss:
        outcomes = job.pre_process(rows)
    assert [o.status for o in outcomes] == ["kept", "error", "kept"]
    assert_output_limit(outcomes[1].error)
    assert rss.growth < WORKER_GROWTH_LIMIT, f"the worker grew by {rss.growth / MIB:.0f} MiB"
    assert time.monotonic() - started < LIMITS.call_timeout_s  # refused at once, not timed out
    assert [o.value["i"] for o in outcomes if o.kept] == [0, 2]


@needs_firejail
@pytest.mark.parametrize("attack", ["deep", "not-json"])
def test_a_frame_that_cannot_be_decoded_fails_only_its_row(job, attack):
    outcomes = job.pre_process([{"i": 0}, {"i": 1, "attack": attack}, {"i": 2}])
    assert [o.status for o in outcomes] == ["kept", "error", "kept"]
    assert outcomes[1].error.kind == "protocol"
    assert job.call_tool("ping", {}).content == "pong"


@needs_firejail
def test_outcomes_of_the_wrong_shape_are_errors_of_their_rows(sandbox):
    job = open_job(sandbox, limits=LIMITS.model_copy(update={"call_timeout_s": 1.0}), pre_processor=hostile_row)
    try:
        outcomes = job.pre_process([{"i": 0, "attack": "garbage"}, {"i": 1}, {"i": 2}])
        assert [o.status for o in outcomes] == ["error", "error", "error"]
        assert outcomes[0].error.type == "NestingLimit"  # decodable, but too deep for later stages
        assert outcomes[1].error.kind == "exception" and len(outcomes[1].error.message) <= 4000
        assert outcomes[2].error.kind == "protocol"
        assert within(30, lambda: job.call_tool("ping", {})).content == "pong"
    finally:
        sandbox.close_job(job.job_id)


# -- ordinary output over output_mb ------------------------------------------------------------


@needs_firejail
def test_ordinary_output_over_output_mb_fails_the_rows_that_do_not_fit(job):
    """A post-processor that returns six times output_mb in 8 MiB records: the batch keeps what
    fits in output_mb, the other records get a limit error, and small records after them pass."""
    records = [{"i": i, "mib": 8} for i in range(12)] + [{"i": 12, "mib": 0}]
    started_before = job.interpreters_started
    with PeakRSS() as rss:
        outcomes = job.post_process(records)
    assert [o.status for o in outcomes] == ["kept"] + ["error"] * 11 + ["kept"]
    for outcome in outcomes[1:12]:
        assert_output_limit(outcome.error)
    assert outcomes[12].value == {"i": 12, "text": ""}
    assert rss.growth < WORKER_GROWTH_LIMIT, f"the worker grew by {rss.growth / MIB:.0f} MiB"
    assert job.interpreters_started == started_before  # honest code keeps within it: nothing was killed


@needs_firejail
def test_each_batch_has_its_own_output_mb(job):
    for _ in range(3):
        outcomes = job.post_process([{"i": 0, "mib": 10}])
        assert outcomes[0].kept and len(outcomes[0].value["text"]) == 10 * MIB


# -- tool calls --------------------------------------------------------------------------------


@needs_firejail
def test_a_deeply_nested_tool_answer_fails_only_that_call(job):
    outcome = job.call_tool("forging_tool", {"attack": "deep"})
    assert outcome.error.kind == "protocol"
    for _ in range(3):  # the job's only interpreter slot came back
        assert within(30, lambda: job.call_tool("ping", {})).content == "pong"


@needs_firejail
def test_a_forged_huge_tool_answer_is_refused_before_it_is_read(job):
    started = time.monotonic()
    with PeakRSS() as rss:
        outcome = job.call_tool("forging_tool", {"attack": "huge-header"})
    assert_output_limit(outcome.error)
    assert time.monotonic() - started < LIMITS.call_timeout_s
    assert rss.growth < WORKER_GROWTH_LIMIT, f"the worker grew by {rss.growth / MIB:.0f} MiB"
    assert within(30, lambda: job.call_tool("ping", {})).content == "pong"


@needs_firejail
def test_a_tool_answer_over_output_mb_is_a_limit_error(job):
    started_before = job.interpreters_started
    assert len(job.call_tool("big_answer", {"mib": OUTPUT_MB // 2}).content) == OUTPUT_MB // 2 * MIB
    with PeakRSS() as rss:
        outcome = job.call_tool("big_answer", {"mib": 3 * OUTPUT_MB})
    assert_output_limit(outcome.error)
    assert rss.growth < WORKER_GROWTH_LIMIT
    assert job.interpreters_started == started_before
    assert job.call_tool("ping", {}).content == "pong"


# -- the pool ----------------------------------------------------------------------------------


@needs_firejail
def test_waiting_for_a_busy_pool_times_out_with_a_clear_error(job):
    job.checkout_timeout_s = 0.5
    napping = threading.Thread(target=lambda: job.call_tool("nap", {"seconds": 3}))
    napping.start()
    time.sleep(0.5)  # the nap has the job's only interpreter
    try:
        started = time.monotonic()
        outcome = job.call_tool("ping", {})
        assert time.monotonic() - started < 2
        assert outcome.error.kind == "timeout" and outcome.error.type == "SandboxBusy"
        assert "no interpreter of job" in outcome.error.message and "0.5 s" in outcome.error.message
        with pytest.raises(SandboxError, match="no interpreter of job"):
            job.pre_process([{"i": 0}])
    finally:
        napping.join()
    assert job.call_tool("ping", {}).content == "pong"


# -- the cost that output_mb counts --------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=8) | st.dictionaries(st.text(max_size=10), children, max_size=8),
    max_leaves=60,
)


@given(st.lists(json_values, min_size=1, max_size=6))
@settings(max_examples=60, deadline=None)
def test_answer_cost_is_additive_and_bounds_what_decoding_takes(values):
    """The jail fits outcomes one by one with the cost of each, the worker charges whole frames:
    the two agree only if the cost is additive. And it must bound what decoding creates."""
    parts = [json.dumps(v).encode() for v in values]
    frame = b"[" + b",".join(parts) + b"]"
    separators = (len(parts) - 1) * answer_cost(b",")
    assert answer_cost(frame) == answer_cost(b"[]") + sum(map(answer_cost, parts)) + separators
    tracemalloc.start()
    try:
        decoded = json.loads(frame)
        retained = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    del decoded
    # Characters beyond Latin-1 take 2 or 4 bytes each once decoded, hence the stated 4x at worst.
    assert retained <= 4 * answer_cost(frame) + ROW_SLACK


def test_answer_cost_of_pathological_shapes_tracks_their_decoded_size():
    shapes = {
        "empty lists": b"[" + b",".join([b"[]"] * 100_000) + b"]",
        "empty dicts": b"[" + b",".join([b"{}"] * 100_000) + b"]",
        "short strings": b"[" + b",".join([b'"ab"'] * 100_000) + b"]",
        "numbers": b"[" + b",".join([b"300"] * 100_000) + b"]",
        "floats": b"[" + b",".join([b"1e1"] * 100_000) + b"]",
        "NaNs": b"[" + b",".join([b"NaN"] * 100_000) + b"]",
        "dict members": b"{" + b",".join(b'"%x":0' % i for i in range(100_000)) + b"}",
    }
    for name, frame in shapes.items():
        tracemalloc.start()
        try:
            decoded = json.loads(frame)
            retained = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        del decoded
        assert retained <= 1.25 * answer_cost(frame), f"{name}: {retained / answer_cost(frame):.2f}x its cost"
