"""The start-up configuration of a jailed interpreter: typed on the worker (JailConfig), a plain
dict in the jail (spider.sandbox.jailed, which runs with the standard library only)."""

from __future__ import annotations

import dataclasses
import marshal
import re
from pathlib import Path

from spider.sandbox import jailed
from spider.sandbox.interpreter import JailConfig, encode_request

JAILED_SOURCE = Path(jailed.__file__).read_text()


def keys_the_jail_reads() -> set[str]:
    return set(re.findall(r"\bconfig(?:\[|\.get\()\s*[\"'](\w+)[\"']", JAILED_SOURCE))


def example() -> JailConfig:
    return JailConfig(
        scratch=Path("/sandbox/jobs/j1/scratch"),
        runtime_dir=Path("/sandbox/runtime/abc"),
        bundle=Path("/sandbox/jobs/j1/bundle.bin"),
        venv=Path("/sandbox/venvs/v1"),
        env={"PATH": "/usr/bin", "SECRET": "s"},
        call_timeout_s=2.5,
        cpu_seconds=7,
        uid=61000,
        gid=61000,
        reap_others=True,
        egress_socket=Path("/sandbox/jobs/j1/egress/proxy.sock"),
    )


def test_every_key_the_jail_reads_is_a_field_and_every_field_is_read():
    fields = {f.name for f in dataclasses.fields(JailConfig)}
    read = keys_the_jail_reads()
    assert {"uid", "scratch", "bundle", "env"} <= read  # the pattern finds both config[...] and config.get(...)
    assert read - fields == set(), "jailed.py reads keys that JailConfig does not send"
    assert fields - read == set(), "JailConfig sends fields that jailed.py never reads"


def test_the_wire_form_is_plain_data_with_paths_as_strings():
    config = example()
    wire = config.to_wire()
    assert set(wire) == {f.name for f in dataclasses.fields(JailConfig)}
    assert marshal.loads(encode_request(wire)) == wire  # marshal refuses anything but plain data
    assert wire["scratch"] == "/sandbox/jobs/j1/scratch" and wire["egress_socket"] == "/sandbox/jobs/j1/egress/proxy.sock"
    assert wire["uid"] == 61000 and wire["call_timeout_s"] == 2.5 and wire["reap_others"] is True
    assert wire["env"] == {"PATH": "/usr/bin", "SECRET": "s"} and wire["env"] is not config.env


def test_optional_fields_default_to_no_user_switch_no_reaping_no_egress():
    full = example()
    required = {f.name: getattr(full, f.name) for f in dataclasses.fields(JailConfig) if f.default is dataclasses.MISSING}
    wire = JailConfig(**required).to_wire()
    assert (wire["uid"], wire["gid"], wire["reap_others"], wire["egress_socket"]) == (None, None, False, None)
    encode_request(wire)
