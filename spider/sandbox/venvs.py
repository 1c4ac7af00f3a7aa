"""Dependency venvs for user code: one per distinct requirement set, built once and cached.

A venv is keyed by a hash of the sorted requirements and the jail interpreter's version, built
from the system's Python (whose files live in /usr, visible inside the jail, unlike a pyenv under
a hidden home), under a file lock so that two workers on one host never build the same one, and
inside a jail of its own: pip runs package build scripts, which are user-chosen code too.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from spider.errors import SandboxError
from spider.sandbox.jail import BUILD_UID, JailLimits, JailSpec, firejail_argv, strip_firejail_noise, write_profile

log = logging.getLogger("spider.sandbox")

READY_MARKER = ".spider-ready"
# Variables of the worker's own environment that configure how pip reaches the package index.
PIP_ENV = (
    "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_TRUSTED_HOST", "PIP_CERT", "PIP_DEFAULT_TIMEOUT",
    "PIP_RETRIES", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy",
    "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE",
)


def normalize_requirements(packages: list[str]) -> list[str]:
    """Sorted, de-duplicated requirement strings; pip options are refused (they could point pip
    at another index or at files of the worker)."""
    cleaned = set()
    for requirement in packages:
        if not isinstance(requirement, str) or not requirement.strip():
            raise SandboxError(f"runtime.packages holds an empty or non-string entry: {requirement!r}")
        requirement = requirement.strip()
        if requirement.startswith("-") or "\n" in requirement or "\x00" in requirement:
            raise SandboxError(
                f"runtime.packages entry {requirement!r} is not a requirement: give pip requirement strings "
                "such as 'requests>=2' or 'pkg @ https://...', not pip options"
            )
        cleaned.add(requirement)
    return sorted(cleaned)


class VenvCache:
    """Builds and hands out the venv for a requirement set under `root`."""

    def __init__(
        self,
        root: Path,
        python: str,
        python_version: str,
        firejail: str | None,
        build_timeout_s: float = 600.0,
        memory_mb: int = 2048,
    ):
        self.root = root
        self.python = python
        self.python_version = python_version
        self.firejail = firejail
        self.build_timeout_s = build_timeout_s
        self.memory_mb = memory_mb
        root.mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o755)

    def key(self, packages: list[str]) -> str:
        material = json.dumps(
            {"python": self.python_version, "interpreter": self.python, "requirements": normalize_requirements(packages)}
        )
        return hashlib.sha256(material.encode()).hexdigest()[:20]

    def path_for(self, packages: list[str]) -> Path:
        return self.root / self.key(packages)

    def ensure(self, packages: list[str]) -> Path:
        """The ready venv for `packages`, building it first if no worker has yet."""
        requirements = normalize_requirements(packages)
        venv = self.path_for(requirements)
        if (venv / READY_MARKER).exists():
            return venv
        lock_path = self.root / f"{venv.name}.lock"
        with open(lock_path, "a+") as lock:
            self._acquire(lock, venv)
            try:
                if (venv / READY_MARKER).exists():  # another worker built it while we waited
                    return venv
                self._build(venv, requirements)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        return venv

    def _acquire(self, lock, venv: Path) -> None:
        deadline = time.monotonic() + self.build_timeout_s + 60
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise SandboxError(f"timed out waiting for another worker to build the venv {venv.name}") from None
                time.sleep(0.2)

    def _build(self, venv: Path, requirements: list[str]) -> None:
        if venv.exists():
            shutil.rmtree(venv)  # a build that died half-way
        venv.mkdir(mode=0o755)
        as_root = os.geteuid() == 0
        if as_root:
            os.chown(venv, BUILD_UID, BUILD_UID)
        started = time.monotonic()
        try:
            create = [self.python, "-I", "-m", "venv"] + ([] if requirements else ["--without-pip"]) + [str(venv)]
            self._run_jailed(create, venv, started, requirements, step="create")
            if requirements:
                install = [
                    str(venv / "bin" / "python"), "-I", "-m", "pip", "install", "--no-cache-dir",
                    "--disable-pip-version-check", "--no-input", "--progress-bar", "off", *requirements,
                ]
                self._run_jailed(install, venv, started, requirements, step="install")
        except BaseException:
            shutil.rmtree(venv, ignore_errors=True)
            raise
        if as_root:
            for directory, dirs, files in os.walk(venv):
                for name in [*dirs, *files]:
                    os.lchown(os.path.join(directory, name), 0, 0)
            os.chown(venv, 0, 0)
        (venv / READY_MARKER).write_text(json.dumps({"requirements": requirements, "python": self.python_version}))
        log.info("built venv %s for %s in %.1f s", venv.name, requirements or "(no packages)", time.monotonic() - started)

    def _run_jailed(self, command: list[str], venv: Path, started: float, requirements: list[str], step: str) -> None:
        home = venv / ".build-home"
        env = {"PATH": f"{venv}/bin:/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(home), "TMPDIR": str(home)}
        env.update({name: os.environ[name] for name in PIP_ENV if name in os.environ})
        preexec = None
        if self.firejail is not None:
            spec = JailSpec(
                readable=[],
                writable=[venv],
                limits=JailLimits(
                    memory_mb=self.memory_mb,
                    cpu_seconds_total=int(self.build_timeout_s) + 1,
                    max_processes=256,
                    file_size_mb=1024,
                ),
                network=True,
                extra_etc=["pip.conf", f"python{self.python_version}"],
                hostname="spider-venv-build",
            )
            setuid = ["/usr/bin/setpriv", f"--reuid={BUILD_UID}", f"--regid={BUILD_UID}", "--clear-groups"]
            profile = write_profile(spec, self.root / f"{venv.name}.profile")
            command = firejail_argv(self.firejail, profile, setuid + command if os.geteuid() == 0 else command)
        else:
            preexec = _build_limits(self.memory_mb)
        home.mkdir(exist_ok=True)
        if os.geteuid() == 0:
            os.chown(home, BUILD_UID, BUILD_UID)
        remaining = self.build_timeout_s - (time.monotonic() - started)
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=str(venv),
            start_new_session=True,
            preexec_fn=preexec,
        )
        try:
            output, _ = process.communicate(timeout=max(remaining, 1))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise SandboxError(
                f"installing runtime.packages {requirements} took longer than {self.build_timeout_s:g} s and was "
                "stopped; use fewer or lighter packages (wheels install much faster than source builds)"
            ) from None
        finally:
            shutil.rmtree(home, ignore_errors=True)
            if self.firejail is not None:
                profile.unlink(missing_ok=True)
        if process.returncode != 0:
            tail = "\n  ".join(strip_firejail_noise(output.decode(errors="replace")).strip().splitlines()[-15:])
            if step == "create":
                raise SandboxError(f"could not create a venv with {self.python} (is python3-venv installed?):\n  {tail}")
            raise SandboxError(
                f"could not install runtime.packages {requirements} (pip exit status {process.returncode}); "
                f"check the names and versions. pip said:\n  {tail}"
            )


def _build_limits(memory_mb: int):
    def apply() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (memory_mb * 1024 * 1024,) * 2)

    return apply
