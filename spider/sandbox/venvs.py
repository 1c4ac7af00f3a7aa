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
from typing import Any

from spider.errors import SandboxError
from spider.policy import Policy
from spider.sandbox import jailed
from spider.sandbox.egress import EgressProxy, EgressRules
from spider.sandbox.jail import BUILD_UID, JailLimits, JailSpec, firejail_argv, strip_firejail_noise, write_profile

log = logging.getLogger("spider.sandbox")

READY_MARKER = ".spider-ready"
# Variables of the worker's own environment that configure how pip reaches the package index.
# (Proxy variables are not among them: a build's only way out is its egress proxy.)
PIP_ENV = (
    "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_TRUSTED_HOST", "PIP_CERT", "PIP_DEFAULT_TIMEOUT",
    "PIP_RETRIES", "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE",
)
VCS_SCHEMES = ("git+", "hg+", "svn+", "bzr+")
# Names pip takes for archive files rather than for projects on the index.
ARCHIVE_SUFFIXES = (".zip", ".whl", ".tar", ".tgz", ".tbz", ".txz", ".tlz", ".tar.gz", ".tar.bz2", ".tar.xz", ".tar.lz", ".tar.lzma")


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


def non_index_source(requirement: str) -> str | None:
    """What `requirement` names instead of a project on the package index (a direct URL, a VCS
    repository, a local path or archive), or None when it is a plain index requirement such as
    `name[extra]>=1.2; python_version >= "3.10"`."""
    from packaging.requirements import InvalidRequirement, Requirement

    lowered = requirement.lower()
    try:
        parsed = Requirement(requirement)
    except InvalidRequirement:
        if lowered.startswith(VCS_SCHEMES):
            return "a VCS repository"
        return "a URL" if "://" in requirement else "a local path or archive (or it is not a valid requirement)"
    if parsed.url:
        return "a VCS repository" if parsed.url.lower().startswith(VCS_SCHEMES) else "a direct URL"
    if parsed.name.lower().endswith(ARCHIVE_SUFFIXES):
        return "a local archive"
    return None


def check_sources(requirements: list[str], allow_direct_url: bool) -> None:
    """Refuse requirements that do not come from the package index, unless the operator allows them."""
    if allow_direct_url:
        return
    for requirement in requirements:
        source = non_index_source(requirement)
        if source is not None:
            raise SandboxError(
                f"runtime.packages entry {requirement!r} names {source}, not a package on the index; give a "
                "requirement such as 'requests>=2' (direct URLs, VCS links and file paths are allowed only when "
                "the operator sets SPIDER_ALLOW_DIRECT_URL_PACKAGES=1)"
            )


class VenvCache:
    """Builds and hands out the venv for a requirement set under `root`.

    `policy` (default: `Policy.from_env()`) says which package index hosts builds may reach and
    whether requirements may name URLs, VCS repositories or files."""

    def __init__(
        self,
        root: Path,
        python: str,
        python_version: str,
        firejail: str | None,
        build_timeout_s: float = 600.0,
        memory_mb: int = 2048,
        policy: Policy | None = None,
    ):
        self.policy = policy if policy is not None else Policy.from_env()
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
        check_sources(requirements, self.policy.allow_direct_url_packages)
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
        # Only pip's downloads need the network, and only the package index, through a proxy.
        egress_dir = self.root / f"{venv.name}.egress"
        proxy = self._start_proxy(egress_dir, venv) if step == "install" and self.firejail is not None else None
        try:
            command, preexec = self._confine(command, venv, proxy)
            status, output = self._run(command, preexec, venv, started, requirements)
        finally:
            (self.root / f"{venv.name}.profile").unlink(missing_ok=True)
            if proxy is not None:
                proxy.close()
            shutil.rmtree(egress_dir, ignore_errors=True)
        if status != 0:
            tail = "\n  ".join(strip_firejail_noise(output.decode(errors="replace")).strip().splitlines()[-15:])
            if step == "create":
                raise SandboxError(f"could not create a venv with {self.python} (is python3-venv installed?):\n  {tail}")
            raise SandboxError(
                f"could not install runtime.packages {requirements} (pip exit status {status}); "
                f"check the names and versions. pip said:\n  {tail}"
            )

    def _start_proxy(self, egress_dir: Path, venv: Path) -> EgressProxy:
        """The build's egress proxy, and a copy of the relay that leads to it, in a directory the
        build jail sees read-only."""
        shutil.rmtree(egress_dir, ignore_errors=True)
        egress_dir.mkdir(mode=0o755)
        os.chmod(egress_dir, 0o755)
        relay = egress_dir / "spider_jail.py"
        relay.write_bytes(Path(jailed.__file__).read_bytes())
        os.chmod(relay, 0o644)
        owner = BUILD_UID if os.geteuid() == 0 else None
        rules = EgressRules.for_builds(self.policy)
        return EgressProxy(egress_dir / "proxy.sock", rules, owner=owner, name=f"venv-build-{venv.name}").start()

    def _confine(self, command: list[str], venv: Path, proxy: EgressProxy | None) -> tuple[list[str], Any]:
        """The argv that runs `command` in a build jail (behind the relay to `proxy`, if any), and
        the preexec function of an unjailed build (unsafe mode: resource limits only)."""
        if self.firejail is None:
            return command, _build_limits(self.memory_mb)
        readable = []
        if proxy is not None:
            relay = proxy.socket_path.parent / "spider_jail.py"
            command = [self.python, "-I", "-S", str(relay), "--egress-relay", str(proxy.socket_path), "--", *command]
            readable.append(proxy.socket_path.parent)
        spec = JailSpec(
            readable=readable,
            writable=[venv],
            limits=JailLimits(
                memory_mb=self.memory_mb,
                cpu_seconds_total=int(self.build_timeout_s) + 1,
                max_processes=256,
                file_size_mb=1024,
            ),
            network=proxy is not None,
            extra_etc=["pip.conf", f"python{self.python_version}"],
            hostname="spider-venv-build",
        )
        if os.geteuid() == 0:
            command = ["/usr/bin/setpriv", f"--reuid={BUILD_UID}", f"--regid={BUILD_UID}", "--clear-groups", *command]
        profile = write_profile(spec, self.root / f"{venv.name}.profile")
        return firejail_argv(self.firejail, profile, command), None

    def _run(self, command: list[str], preexec: Any, venv: Path, started: float, requirements: list[str]) -> tuple[int, bytes]:
        """Run one build step in `venv` within what is left of the build's time; its exit status
        and output."""
        home = venv / ".build-home"
        # Built from nothing: no job's secrets or variables, nothing of the worker's but pip's settings.
        env = {"PATH": f"{venv}/bin:/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": str(home), "TMPDIR": str(home)}
        env.update({name: os.environ[name] for name in PIP_ENV if name in os.environ})
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
        return process.returncode, output


def _build_limits(memory_mb: int):
    def apply() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (memory_mb * 1024 * 1024,) * 2)

    return apply
