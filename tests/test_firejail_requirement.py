"""The jail tests skip without firejail on a developer's machine, and fail instead where it is
required (SPIDER_REQUIRE_FIREJAIL=1, as .ci/run sets it), so CI cannot go green without them."""

from __future__ import annotations

import re

import pytest

from tests.helpers import REQUIRE_FIREJAIL, ROOT, require_firejail

MISSING = "/nonexistent/firejail"
JAIL_TEST_MODULES = (
    "test_sandbox.py", "test_sandbox_escape.py", "test_sandbox_venv.py", "test_security_jail_network.py",
    "test_security_sandbox_disk.py", "test_security_sandbox_output.py", "test_usercode_stack.py",
)  # fmt: skip


def test_missing_firejail_fails_when_it_is_required():
    with pytest.raises(pytest.fail.Exception, match=f"firejail is not installed.*{REQUIRE_FIREJAIL}=1"):
        require_firejail(MISSING, environ={REQUIRE_FIREJAIL: "1"})


@pytest.mark.parametrize("environ", [{}, {REQUIRE_FIREJAIL: "0"}, {REQUIRE_FIREJAIL: ""}])
def test_missing_firejail_skips_when_it_is_not_required(environ):
    with pytest.raises(pytest.skip.Exception, match="firejail is not installed"):
        require_firejail(MISSING, environ=environ)


def test_an_installed_firejail_is_returned(tmp_path):
    fake = tmp_path / "firejail"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    assert require_firejail(fake, environ={REQUIRE_FIREJAIL: "1"}) == str(fake)


def test_every_jail_test_module_goes_through_the_one_check():
    for name in JAIL_TEST_MODULES:
        source = (ROOT / "tests" / name).read_text()
        assert '"firejail"' in source or "(firejail," in source, f"{name} does not request the firejail fixture"
    for path in (ROOT / "tests").glob("test_*.py"):
        source = path.read_text()
        assert not re.search(r"which\(\s*[\"']firejail", source), f"{path.name} looks for firejail on its own"


def test_ci_requires_firejail():
    script = (ROOT / ".ci" / "run").read_text()
    assert f"export {REQUIRE_FIREJAIL}=1" in script
    assert script.index(f"export {REQUIRE_FIREJAIL}=1") < script.index("scripts/test")
