#!/usr/bin/env bash
# Set up imgclass in ./.venv and fetch the model. Safe to run again: it only does what is missing.
#
#   ./install_script.sh                 runtime: venv, package, model files (sha256-checked)
#   ./install_script.sh --dev           also the test tools: pytest, ruff, TensorFlow (keras backend),
#                                       and the Debian packages the tests drive (chromium, nginx)
#   ./install_script.sh --tensorflow    runtime plus the keras backend
#   ./install_script.sh --role server|balancer|client [--systemd]
#                                       a testbed node (Ubuntu 22.04/24.04): its apt packages, the
#                                       venv, the model for servers; --systemd installs the role's
#                                       units (imgclass-server/worker or -balancer/redis.service,
#                                       restarted on failure; deploy enables the ones in use)
#
# With no internet, point IMGCLASS_MODEL_DIR at a folder holding the model files.
set -euo pipefail
cd "$(dirname "$0")"

dev=0; tf=0; role=""; systemd=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dev) dev=1; tf=1 ;;
    --tensorflow) tf=1 ;;
    --role) shift; role="${1:-}" ;;
    --role=*) role="${1#--role=}" ;;
    --systemd) systemd=1 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "install_script.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
case "$role" in
  ""|server|balancer|client) ;;
  *) echo "install_script.sh: --role must be server, balancer or client, not '$role'" >&2; exit 2 ;;
esac
if [ $systemd = 1 ] && { [ -z "$role" ] || [ "$role" = client ]; }; then
  echo "install_script.sh: --systemd needs --role server or --role balancer" >&2; exit 2
fi

say() { printf 'install_script: %s\n' "$*"; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo "$@"
  else return 1
  fi
}

apt_install() {  # apt_install PKG...: install the missing ones, if we may
  local missing=()
  for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null || { say "no apt-get: install ${missing[*]} yourself"; return 0; }
  say "apt-get install ${missing[*]}"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq \
    && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null \
    || say "could not install ${missing[*]} (not root?); the tests that need them will skip"
}

if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
  apt_install python3-venv
fi
if [ -n "$role" ]; then
  apt_install ca-certificates
fi

if [ ! -x .venv/bin/python ]; then
  say "creating .venv"
  python3 -m venv .venv
fi

extras=""
[ $dev = 1 ] && extras="dev"
[ $tf = 1 ] && extras="${extras:+$extras,}tensorflow"
spec=".${extras:+[$extras]}"
stamp=".venv/.imgclass-installed"
want="$(cat pyproject.toml | sha256sum | cut -c1-16) $spec"
if [ ! -f "$stamp" ] || ! grep -qxF "$want" "$stamp"; then
  say "pip install -e '$spec'"
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q --disable-pip-version-check -e "$spec"
  echo "$want" >> "$stamp"
else
  say "package already installed ($spec)"
fi

# Redis is the job queue of queue mode (imgclass up --dispatch queue starts its own redis-server);
# HAProxy is the data plane of engine mode (--engine haproxy).
if [ -z "$role" ] || [ "$role" = balancer ]; then
  apt_install redis-server haproxy
fi

if [ $dev = 1 ]; then
  apt_install chromium chromium-driver nginx openssh-server openssh-client wrk iproute2 redis-server haproxy
fi

if [ -z "$role" ] || [ "$role" = server ]; then
  .venv/bin/imgclass fetch-model --dest models
fi

if [ $systemd = 1 ]; then
  # a server node may run a model server or a queue worker; a balancer node the balancer (or the
  # queue's front) and the queue's Redis: every unit is written, and deploy enables those in use
  case "$role" in server) units="server worker" ;; balancer) units="balancer redis" ;; esac
  for name in $units; do
    unit="/etc/systemd/system/imgclass-$name.service"
    say "writing $unit"
    .venv/bin/imgclass testbed unit --role "$name" --dir "$PWD" | as_root tee "$unit" > /dev/null
  done
  as_root systemctl daemon-reload
fi
