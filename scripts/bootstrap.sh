# Sourced by scripts/demo and scripts/test: install what is missing, idempotently.
# Debian packages: fuse3 (fusermount3) and libfuse3-dev (to build pyfuse3); a .venv with the package.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

_need_apt=()
command -v fusermount3 >/dev/null 2>&1 || _need_apt+=(fuse3)
pkg-config --exists fuse3 2>/dev/null || _need_apt+=(libfuse3-dev pkg-config)
# pyfuse3 is built from source: a C compiler and the Python headers
command -v cc >/dev/null 2>&1 || _need_apt+=(gcc)
if ! command -v python3 >/dev/null 2>&1; then
  _need_apt+=(python3 python3-venv python3-dev)
else
  python3 -c "import venv, ensurepip" 2>/dev/null || _need_apt+=(python3-venv)
  python3 -c "import os, sysconfig; raise SystemExit(not os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h')))" \
    || _need_apt+=(python3-dev)
fi
# programs a caller needs as "command:package" pairs (scripts/test: the programs the suite drives);
# a command given as a path pattern is looked for there (Debian keeps PostgreSQL's initdb off PATH)
for _pair in ${BOOTSTRAP_PROGRAMS:-}; do
  _cmd="${_pair%%:*}"
  if [[ "$_cmd" == */* ]]; then
    compgen -G "$_cmd" >/dev/null || _need_apt+=("${_pair#*:}")
  else
    command -v "$_cmd" >/dev/null 2>&1 || _need_apt+=("${_pair#*:}")
  fi
done
if [ ${#_need_apt[@]} -gt 0 ]; then
  echo "bootstrap: installing Debian packages: ${_need_apt[*]}" >&2
  _sudo=""; [ "$(id -u)" -eq 0 ] || _sudo="sudo"
  if [[ " ${_need_apt[*]} " == *" postgresql "* ]]; then
    # only the programs: the tests start throw-away clusters of their own, so Debian makes and starts none
    $_sudo mkdir -p /etc/postgresql-common/createcluster.d
    echo "create_main_cluster = false" | $_sudo tee /etc/postgresql-common/createcluster.d/no-main-cluster.conf >/dev/null
  fi
  $_sudo apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $_sudo apt-get install -y -qq "${_need_apt[@]}" >&2
fi

_stamp=".venv/.installed-$(cat pyproject.toml | sha256sum | cut -c1-16)"
if [ ! -f "$_stamp" ]; then
  echo "bootstrap: installing the package into .venv" >&2
  # (made anew where an interrupted first run left one without pip)
  .venv/bin/python -m pip --version >/dev/null 2>&1 || python3 -m venv --clear .venv >&2
  .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[mount,mcp,test,postgresql]" >&2
  rm -f .venv/.installed-*
  touch "$_stamp"
fi
export PATH="$REPO/.venv/bin:$PATH"
# The demo and the suite start many Python processes (hooks, the CLI, mount daemons, workers). With
# PYTHONDONTWRITEBYTECODE set, as on these machines, each would compile this repository's modules
# anew from source (a third of the suite's time): compiled once here (only what changed since).
.venv/bin/python -m compileall -q coherent_volume fusefs tests scripts >/dev/null
