#!/usr/bin/env bash
# Prepare a Debian machine for pgdr: system packages, then the virtualenv.
# Idempotent and non-interactive (CI runs it as root with no stdin).
#   scripts/setup.sh system   install missing Debian packages
#   scripts/setup.sh venv     create .venv and install pgdr with its dev extras
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf 'setup: %s\n' "$*" >&2; }

as_root() {
    if [[ $(id -u) -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        # Without a terminal a password prompt would hang CI: fail fast instead.
        if [[ -t 0 ]]; then sudo "$@"; else sudo -n "$@"; fi
    else
        log "need root (or sudo) to run: $*"
        return 1
    fi
}

missing_packages() {
    local missing=()
    # The server binaries, not just the client: tests initdb their own clusters.
    compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || missing+=(postgresql)
    command -v psql >/dev/null 2>&1 || missing+=(postgresql-client)
    for tool in gpg gpg-agent gpgconf; do
        command -v "$tool" >/dev/null 2>&1 || { missing+=(gnupg); break; }
    done
    command -v zstd >/dev/null 2>&1 || missing+=(zstd)
    command -v runuser >/dev/null 2>&1 || missing+=(util-linux)
    command -v python3 >/dev/null 2>&1 || missing+=(python3)
    # Debian splits venv/ensurepip out of python3.
    if ! "$(venv_python)" -c 'import ensurepip, venv' >/dev/null 2>&1; then
        missing+=(python3-venv)
    fi
    printf '%s\n' "${missing[@]}" | sort -u | sed '/^$/d'
}

install_system() {
    local pkgs
    mapfile -t pkgs < <(missing_packages)
    if ((${#pkgs[@]} == 0)); then
        return 0
    fi
    log "installing Debian packages: ${pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    as_root apt-get update -q
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        "${pkgs[@]}"
}

# The venv's interpreter must be executable by the postgres OS user too: the server
# runs `pgdr wal-push` as its archive_command. A python3 under a private home
# (pyenv in /root) is not, so prefer the system one when it is recent enough.
venv_python() {
    if [[ -n ${SETUP_PYTHON:-} ]]; then
        echo "$SETUP_PYTHON"
    elif /usr/bin/python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        echo /usr/bin/python3
    else
        echo python3
    fi
}

install_venv() {
    if [[ ! -x .venv/bin/python ]]; then
        local python
        python=$(venv_python)
        log "creating .venv with $python"
        "$python" -m venv .venv
    fi
    log "installing pgdr and its dev dependencies into .venv"
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e '.[dev]'
}

case "${1:-all}" in
    system) install_system ;;
    venv) install_venv ;;
    all) install_system; install_venv ;;
    *) log "usage: $0 [system|venv|all]"; exit 2 ;;
esac
