#!/usr/bin/env bash
# System packages for Spider's sandbox workers: firejail (the jail), the system Python with venv
# support (jailed interpreters and dependency venvs are built from it: a Python under a hidden
# home, like pyenv's under /root, cannot start inside a jail) and setpriv (util-linux), which
# drops venv builds to an unprivileged user. For the tests of the deployment files: a Compose
# tool that checks docker-compose.yml (`docker compose`, else Debian's docker-compose) and capsh
# (libcap2-bin), which runs a jail with only the sandbox service's capabilities.
# Safe to run again: it installs only what is missing.
set -euo pipefail

missing=()
command -v firejail >/dev/null 2>&1 || missing+=(firejail)
command -v setpriv >/dev/null 2>&1 || missing+=(util-linux)
if ! /usr/bin/python3 -c "import ensurepip, venv" >/dev/null 2>&1; then
  missing+=(python3 python3-venv)
fi
if ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null 2>&1; then
  missing+=(docker-compose)
fi
command -v capsh >/dev/null 2>&1 || missing+=(libcap2-bin)

if [ ${#missing[@]} -eq 0 ]; then
  echo "system packages for the sandbox and the deployment tests: present"
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  echo "install these system packages with your package manager: ${missing[*]}" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi
echo "installing system packages: ${missing[*]}"
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
