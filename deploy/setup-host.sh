#!/usr/bin/env bash
# Prepare a Debian 12 host for Corral (what `make setup` runs, as root).
#
#   - the Debian packages of every program Corral runs, as declared in
#     corral/programs.py for the roles in CORRAL_SETUP_ROLES (default
#     "agent lab tests"; `make bench` adds "bench"), installed without
#     recommends; `apt-get update` only when something must be installed and
#     the package lists are missing or older than CORRAL_APT_MAX_AGE_HOURS (6);
#   - a Python that can make the project's venv;
#   - a CRIU that passes `criu check` (deploy/install-criu.sh);
#   - fs.pipe-max-size >= 4194304, now and after reboots: CRIU's lazy-pages
#     page server needs to grow its pipe beyond the default 1 MiB limit
#     without CAP_SYS_RESOURCE (shared/DESIGN.md, "Post-copy");
#   - the loopback interface up (CRIU's start-up probe connects to 127.0.0.1).
#
#   - a self-check at the end: every declared program of those roles is found;
#   - only when asked (CORRAL_SETUP_UNITS, e.g. "agent controller failoverd"; not
#     by default, not in CI): those systemd units from deploy/systemd/ into
#     /etc/systemd/system, their commands pointed at CORRAL_BIN_DIR (default this
#     checkout's .venv/bin), and each one's example config into /etc/corral/
#     where none is there yet; then `systemctl daemon-reload`. Nothing is
#     enabled or started (deploy/GUIDE.md says what to do next).
#
# Idempotent, needs no input; a second run with everything present takes
# well under 5 s.
set -euo pipefail
umask 022

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
readonly SCRIPT_DIR
readonly PROGRAMS_PY="$SCRIPT_DIR/../corral/programs.py"
read -r -a ROLES <<<"${CORRAL_SETUP_ROLES:-agent lab tests}"
readonly ROLES
readonly APT_MAX_AGE_HOURS=${CORRAL_APT_MAX_AGE_HOURS:-6}
readonly PIPE_MAX_SIZE_MIN=4194304
readonly SYSCTL_FILE=/etc/sysctl.d/60-corral.conf
read -r -a UNITS <<<"${CORRAL_SETUP_UNITS:-}"
readonly UNITS
readonly BIN_DIR=${CORRAL_BIN_DIR:-$(cd "$SCRIPT_DIR/.." && pwd)/.venv/bin}

# Packages that bring no program of ours but that what we run needs: lxc-start
# loads the profile that /etc/lxc/default.conf asks for (`lxc.apparmor.profile =
# generated`) with apparmor_parser, on kernels with AppArmor (Debian's own);
# install-criu.sh fetches and unpacks CRIU's source over HTTPS. The programs'
# own packages come from corral/programs.py. Of lxc's recommends, lxcfs, uidmap
# and libpam-cgfs serve unprivileged containers only.
readonly SUPPORT_PACKAGES=(apparmor xz-utils ca-certificates)

export DEBIAN_FRONTEND=noninteractive
readonly APT_GET=(apt-get -o DPkg::Lock::Timeout=300 -o Dpkg::Use-Pty=0
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)

log() { printf 'setup-host: %s\n' "$*"; }
warn() { printf 'setup-host: WARNING: %s\n' "$*" >&2; }
die() { printf 'setup-host: ERROR: %s\n' "$*" >&2; exit 1; }

START=$EPOCHREALTIME
elapsed() { awk -v a="$START" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.2f s", b - a }'; }

# The given packages that are not installed, one a line.
missing_packages() {
    dpkg-query -W -f='${db:Status-Abbrev} ${binary:Package}\n' "$@" 2>/dev/null \
        | awk '$1 == "ii" { sub(/:.*/, "", $2); print $2 }' >"$TMP_LIST" || true
    local p
    for p in "$@"; do
        grep -qxF "$p" "$TMP_LIST" || printf '%s\n' "$p"
    done
}

apt_lists_fresh() {
    [[ -n "$(find /var/lib/apt/lists -maxdepth 1 -type f -name '*_Packages*' \
        -mmin "-$((APT_MAX_AGE_HOURS * 60))" -print -quit 2>/dev/null)" ]]
}

APT_UPDATED=0
apt_update() {
    ((APT_UPDATED)) && return 0
    log "apt-get update"
    "${APT_GET[@]}" -qq update || die "apt-get update failed"
    APT_UPDATED=1
}

install_packages() {
    local missing=()
    mapfile -t missing < <(missing_packages "$@")
    if ((${#missing[@]} == 0)); then
        log "packages present: $*"
        return 0
    fi
    apt_lists_fresh || apt_update
    log "installing: ${missing[*]}"
    if ! "${APT_GET[@]}" install -y -qq --no-install-recommends "${missing[@]}"; then
        ((APT_UPDATED)) && die "apt-get install ${missing[*]} failed"
        warn "apt-get install failed; refreshing the package lists and retrying"
        apt_update
        "${APT_GET[@]}" install -y -qq --no-install-recommends "${missing[@]}" \
            || die "apt-get install ${missing[*]} failed"
    fi
}

# The project's venv is made with whatever `python3` is on PATH (here a
# pyenv 3.11.7, whose venv and ensurepip are built in). Only a Debian
# python3 lacks them without python3-venv; only a host with no python3 at
# all gets Debian's.
ensure_python_venv() {
    local py
    py=$(command -v python3 || true)
    if [[ -z "$py" ]]; then
        log "no python3 on PATH: installing Debian's python3 and python3-venv"
        install_packages python3 python3-venv
        py=/usr/bin/python3
    fi
    if ! "$py" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        if [[ "$(readlink -f "$py")" == /usr/bin/python3* ]]; then
            install_packages python3-venv
        fi
        "$py" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
            || die "$py ($("$py" --version 2>&1)) cannot make a venv or is older than 3.11"
    fi
    log "python: $py ($("$py" --version 2>&1)), venv OK"
    PYTHON=$py
}

ensure_pipe_max_size() {
    local now
    now=$(cat /proc/sys/fs/pipe-max-size)
    if ((now < PIPE_MAX_SIZE_MIN)); then
        log "fs.pipe-max-size $now -> $PIPE_MAX_SIZE_MIN (CRIU lazy-pages page server)"
        echo "$PIPE_MAX_SIZE_MIN" >/proc/sys/fs/pipe-max-size \
            || die "cannot write /proc/sys/fs/pipe-max-size"
    fi
    local want
    want=$(printf '%s\n' \
        "# Written by Corral's deploy/setup-host.sh." \
        "# CRIU's lazy-pages page server (post-copy migration) grows its pipe to" \
        "# 819 pages; without CAP_SYS_RESOURCE that needs fs.pipe-max-size >= 3354624." \
        "fs.pipe-max-size = $PIPE_MAX_SIZE_MIN")
    if [[ ! -f "$SYSCTL_FILE" || "$(cat "$SYSCTL_FILE")" != "$want" ]]; then
        mkdir -p "$(dirname "$SYSCTL_FILE")"
        printf '%s\n' "$want" >"$SYSCTL_FILE.tmp"
        mv -f "$SYSCTL_FILE.tmp" "$SYSCTL_FILE"
        log "wrote $SYSCTL_FILE"
    fi
}

ensure_loopback_up() {
    if ! ip -o link show lo | grep -q '[<,]UP[,>]'; then
        log "bringing up the loopback interface"
        ip link set lo up || die "cannot bring lo up"
    fi
}

# The systemd units in UNITS (agent, controller, failoverd), their ExecStart pointed at
# BIN_DIR; an example config where there is none. Enables and starts nothing.
install_units() {
    local unit src text config
    for unit in "${UNITS[@]}"; do
        src="$SCRIPT_DIR/systemd/corral-$unit.service"
        [[ -f "$src" ]] || die "no unit $src (CORRAL_SETUP_UNITS: agent, controller, failoverd)"
        text=$(sed "s#/opt/corral/bin/#$BIN_DIR/#g" "$src")
        if [[ "$(cat "/etc/systemd/system/corral-$unit.service" 2>/dev/null)" != "$text" ]]; then
            printf '%s\n' "$text" >"/etc/systemd/system/.corral-$unit.service.tmp"
            chmod 0644 "/etc/systemd/system/.corral-$unit.service.tmp"
            mv -f "/etc/systemd/system/.corral-$unit.service.tmp" "/etc/systemd/system/corral-$unit.service"
            log "installed /etc/systemd/system/corral-$unit.service (not enabled)"
        fi
        case $unit in agent) config=agent.yaml ;; controller) config=controller.yaml ;; *) config=cli.yaml ;; esac
        if [[ ! -e "/etc/corral/$config" ]]; then
            install -d -m 0755 /etc/corral
            install -m 0640 "$SCRIPT_DIR/examples/$config" "/etc/corral/$config"
            log "wrote the example /etc/corral/$config: edit it, then --check-config (deploy/GUIDE.md)"
        fi
    done
    if [[ -d /run/systemd/system ]]; then
        systemctl daemon-reload || warn "systemctl daemon-reload failed"
    else
        warn "systemd is not running here: units installed, not loaded"
    fi
}

main() {
    [[ $(id -u) -eq 0 ]] || die "must run as root"
    [[ -r /etc/debian_version ]] || die "this script is for Debian 12 (no /etc/debian_version)"
    TMP_LIST=$(mktemp)
    trap 'rm -f -- "$TMP_LIST"' EXIT

    ensure_python_venv
    local packages=()
    mapfile -t packages < <("$PYTHON" "$PROGRAMS_PY" packages "${ROLES[@]}") \
        || die "corral/programs.py packages ${ROLES[*]} failed"
    ((${#packages[@]})) || die "corral/programs.py listed no packages for roles: ${ROLES[*]}"
    install_packages "${packages[@]}" "${SUPPORT_PACKAGES[@]}"
    ensure_loopback_up
    bash "$SCRIPT_DIR/install-criu.sh" || die "deploy/install-criu.sh failed"
    ensure_pipe_max_size
    ((${#UNITS[@]} == 0)) || install_units

    local lxc_version criu_bin criu_version criu_check
    lxc_version=$(lxc-start --version 2>/dev/null || echo '?')
    criu_bin=$(command -v criu || echo '')
    if [[ -n "$criu_bin" ]]; then
        criu_version=$("$criu_bin" --version | awk '/^Version:/ { print $2; exit }')
        if criu_check=$("$criu_bin" check 2>&1); then
            criu_check="passed: $(tail -n 1 <<<"$criu_check")"
        else
            criu_check="FAILED: $(grep -m1 -i error <<<"$criu_check" || tail -n 1 <<<"$criu_check")"
        fi
    else
        criu_version="not on PATH"; criu_check="-"
    fi
    # Every program the code runs, found (corral/programs.py; DESIGN.md rule 7).
    local absent
    if ! absent=$("$PYTHON" "$PROGRAMS_PY" check "${ROLES[@]}" 2>&1); then
        die "programs still missing after the install:"$'\n'"$absent"
    fi
    log "declared programs found for roles: ${ROLES[*]}"
    log "summary:"
    printf '  %-16s %s\n' \
        "LXC" "$lxc_version" \
        "CRIU" "${criu_version} (${criu_bin:-?})" \
        "criu check" "$criu_check" \
        "fs.pipe-max-size" "$(cat /proc/sys/fs/pipe-max-size)" \
        "took" "$(elapsed)"
}

main "$@"
