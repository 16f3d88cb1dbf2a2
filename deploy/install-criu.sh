#!/usr/bin/env bash
# Install a CRIU whose `criu check` passes on this host.
#
# Order of preference (see shared/DESIGN.md, "CRIU"):
#   1. a criu already on PATH (/usr/local/sbin/criu first) that passes
#      `criu check`: nothing to do;
#   2. a binary this script built before (cached by the source tarball's
#      sha256 in /var/cache/corral/criu/): install it to /usr/local/sbin;
#   3. Debian's own criu package, if its `criu check` passes here (tested
#      from the downloaded .deb, unpacked in a temporary directory);
#   4. build CRIU 4.2.1 from Debian's forky (or sid) source archive
#      (criu_4.2.1.orig.tar.xz, hash-checked), `make criu`, install the
#      binary to /usr/local/sbin/criu.
#
# The version is pinned: the agent reads CRIU's images (pagemap, stats) and
# relies on its lazy-pages behaviour, both validated against this release, so
# another version installed here is replaced. Why 4.2.1 and not 4.1.1: 4.1.1
# passes `criu check` here but cannot dump a TCP socket on Linux >= 6.16
# ("Can't get 1:16 opt: Operation not supported", CRIU issue #2705, fixed in
# 4.2), so no container running a network service could be live-migrated.
#
# The host's apt configuration is never changed: the source index
# is fetched into a temporary directory with apt's Dir::* options. The
# Debian mirror is taken from the host's own apt sources (or from
# CORRAL_DEBIAN_MIRROR).
#
# Idempotent; must run as root; needs no input.
set -euo pipefail
umask 022

readonly CRIU_UPSTREAM_VERSION=4.2.1
readonly CRIU_DEBIAN_SOURCE_VERSION=4.2.1-1
readonly CRIU_SOURCE_SUITE="forky sid"
readonly CRIU_TARBALL=criu_${CRIU_UPSTREAM_VERSION}.orig.tar.xz
readonly CRIU_TARBALL_SHA256=29ec0ee09e296479fe7048c80980e8ef1d0684d0b0204c2b101dfea19f6725b9
readonly CACHE_DIR=${CORRAL_CRIU_CACHE_DIR:-/var/cache/corral/criu}
readonly INSTALL_PATH=/usr/local/sbin/criu
readonly ARCHIVE_KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
readonly APT_MAX_AGE_HOURS=${CORRAL_APT_MAX_AGE_HOURS:-6}

# Packages CRIU needs to build (`make criu`).
readonly BUILD_DEPS=(
    build-essential make gcc pkg-config
    libprotobuf-dev libprotobuf-c-dev protobuf-c-compiler protobuf-compiler
    python3-protobuf
    libnl-3-dev libnl-route-3-dev libcap-dev libnet1-dev libbsd-dev
    libgnutls28-dev libnftables-dev uuid-dev
)
# Packages CRIU needs at run time: the dump's network lock runs
# iptables-restore/ip6tables-restore, and network namespaces are saved and
# restored with `ip`.
readonly RUNTIME_DEPS=(iptables iproute2)
# What apt itself needs here to fetch the source index.
readonly FETCH_DEPS=(ca-certificates debian-archive-keyring xz-utils)

export DEBIAN_FRONTEND=noninteractive
readonly APT_GET=(apt-get -o DPkg::Lock::Timeout=300 -o Dpkg::Use-Pty=0)

log() { printf 'install-criu: %s\n' "$*"; }
warn() { printf 'install-criu: WARNING: %s\n' "$*" >&2; }
die() { printf 'install-criu: ERROR: %s\n' "$*" >&2; exit 1; }

TMP_DIR=""
cleanup() {
    if [[ -n "$TMP_DIR" && -d "$TMP_DIR" ]]; then
        rm -rf -- "$TMP_DIR"
    fi
}
trap cleanup EXIT
trap 'die "interrupted"' INT TERM

# Sets TMP_DIR (not to be called in a subshell: the EXIT trap removes it).
make_tmp_dir() {
    if [[ -z "$TMP_DIR" ]]; then
        TMP_DIR=$(mktemp -d /tmp/corral-criu.XXXXXX) || die "mktemp failed"
        chmod 0755 "$TMP_DIR" # apt's _apt user downloads into subdirectories
    fi
}

# ---------------------------------------------------------------- apt helpers

package_installed() {
    [[ "$(dpkg-query -W -f='${db:Status-Abbrev}' "$1" 2>/dev/null)" == "ii "* ]]
}

# True if the host's package lists exist and are younger than
# APT_MAX_AGE_HOURS.
apt_lists_fresh() {
    local newest
    newest=$(find /var/lib/apt/lists -maxdepth 1 -type f -name '*_Packages*' \
        -mmin "-$((APT_MAX_AGE_HOURS * 60))" -print -quit 2>/dev/null || true)
    [[ -n "$newest" ]]
}

APT_UPDATED=0
apt_update() {
    if ((APT_UPDATED)); then return 0; fi
    log "apt-get update"
    "${APT_GET[@]}" -qq update || die "apt-get update failed"
    APT_UPDATED=1
}

# Install those of the given packages that are not installed yet.
apt_install_missing() {
    local missing=() p
    for p in "$@"; do
        package_installed "$p" || missing+=("$p")
    done
    ((${#missing[@]})) || return 0
    apt_lists_fresh || apt_update
    log "installing: ${missing[*]}"
    if ! "${APT_GET[@]}" install -y -qq --no-install-recommends "${missing[@]}"; then
        if ((APT_UPDATED)); then die "apt-get install ${missing[*]} failed"; fi
        warn "apt-get install failed; refreshing the package lists and retrying"
        apt_update
        "${APT_GET[@]}" install -y -qq --no-install-recommends "${missing[@]}" \
            || die "apt-get install ${missing[*]} failed"
    fi
}

# The Debian mirror the host already uses, from its own apt sources: the
# first `deb` entry for the release's own suite (not -security/-updates).
debian_mirror() {
    if [[ -n "${CORRAL_DEBIAN_MIRROR:-}" ]]; then
        printf '%s\n' "${CORRAL_DEBIAN_MIRROR%/}"
        return 0
    fi
    local codename uri=""
    # shellcheck disable=SC1091
    codename=$(. /etc/os-release && printf '%s' "${VERSION_CODENAME:-}")
    [[ -n "$codename" ]] || die "cannot read VERSION_CODENAME from /etc/os-release"
    local f
    shopt -s nullglob
    for f in /etc/apt/sources.list.d/*.sources; do
        uri=$(awk -v suite="$codename" '
            function flush() {
                if (enabled && types ~ /(^| )deb( |$)/ && (" " suites " ") ~ (" " suite " ") && uris != "") {
                    split(uris, u, " "); print u[1]; found = 1; exit
                }
                types = ""; uris = ""; suites = ""; enabled = 1
            }
            BEGIN { enabled = 1 }
            /^[ \t]*#/ { next }
            /^[ \t]*$/ { flush(); next }
            {
                key = tolower($1); sub(/:$/, "", key)
                val = $0; sub(/^[^:]*:[ \t]*/, "", val); gsub(/[ \t]+/, " ", val)
                if (key == "types") types = val
                else if (key == "uris") uris = val
                else if (key == "suites") suites = val
                else if (key == "enabled" && tolower(val) == "no") enabled = 0
            }
            END { if (!found) flush() }
        ' "$f")
        [[ -n "$uri" ]] && break
    done
    if [[ -z "$uri" ]]; then
        for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
            [[ -f "$f" ]] || continue
            uri=$(awk -v suite="$codename" '
                $1 == "deb" {
                    i = 2
                    if ($i ~ /^\[/) { while ($i !~ /\]$/ && i < NF) i++; i++ }
                    if ($(i + 1) == suite) { print $i; exit }
                }' "$f")
            [[ -n "$uri" ]] && break
        done
    fi
    shopt -u nullglob
    [[ -n "$uri" ]] || die "no Debian mirror for '$codename' found in /etc/apt/sources.list{,.d/} (set CORRAL_DEBIAN_MIRROR)"
    printf '%s\n' "${uri%/}"
}

# ---------------------------------------------------------------- criu checks

ensure_loopback_up() {
    # CRIU's start-up probe connects to 127.0.0.1 (kerndat_tcp_repair).
    if command -v ip >/dev/null && ! ip -o link show lo 2>/dev/null | grep -q '[<,]UP[,>]'; then
        log "bringing up the loopback interface"
        ip link set lo up
    fi
}

# criu_check BINARY: run `BINARY check`, keep its output in CHECK_OUTPUT.
CHECK_OUTPUT=""
criu_check() {
    local bin=$1 rc=0
    CHECK_OUTPUT=$("$bin" check 2>&1) || rc=$?
    return "$rc"
}

criu_version() {
    "$1" --version 2>/dev/null | awk '/^Version:/ { print $2; exit }'
}

# Say which criu an ordinary PATH finds, and warn if it is not ours.
report_path() {
    local want=$1 found login_found
    found=$(command -v criu || true)
    login_found=$(env -i HOME=/root TERM=dumb LC_ALL=C bash -lc 'command -v criu' </dev/null 2>/dev/null | tail -n1 || true)
    if [[ "$found" != "$want" ]]; then
        warn "this shell's PATH finds '${found:-nothing}' for criu, not $want (PATH=$PATH)"
    fi
    if [[ -n "$login_found" && "$login_found" != "$want" ]]; then
        warn "a login shell's PATH finds '$login_found' for criu, not $want"
    fi
    if [[ "$want" == "$INSTALL_PATH" && -e /usr/sbin/criu ]] && package_installed criu; then
        log "note: Debian's criu package ($(dpkg-query -W -f='${Version}' criu)) is installed and left alone" \
            "as /usr/sbin/criu; LXC runs \`criu\` from PATH, so PATH must list /usr/local/sbin before /usr/sbin" \
            "(Debian's default PATH, sudo's secure_path and systemd's default PATH all do)"
    fi
}

finish() {
    local bin=$1 how=$2
    log "$how: $bin, version $(criu_version "$bin"); criu check: $(tail -n 1 <<<"$CHECK_OUTPUT")"
    report_path "$bin"
}

# Is criu binary $1 the pinned version?
recent_enough() {
    [[ "$(criu_version "$1" 2>/dev/null || true)" == "$CRIU_UPSTREAM_VERSION" ]]
}

# Step 1: an installed criu that already works.
existing_criu_ok() {
    if [[ -x "$INSTALL_PATH" ]] && ! recent_enough "$INSTALL_PATH"; then
        log "$INSTALL_PATH is CRIU $(criu_version "$INSTALL_PATH" || true), not the pinned $CRIU_UPSTREAM_VERSION: replacing it"
        return 1
    fi
    if [[ -x "$INSTALL_PATH" ]]; then
        if criu_check "$INSTALL_PATH"; then
            finish "$INSTALL_PATH" "already installed, nothing to do"
            return 0
        fi
        warn "$INSTALL_PATH exists but \`criu check\` fails:"
        printf '%s\n' "$CHECK_OUTPUT" | sed 's/^/    /' >&2
        return 1
    fi
    local other
    other=$(command -v criu || true)
    if [[ -n "$other" ]] && recent_enough "$other"; then
        if criu_check "$other"; then
            finish "$other" "already installed, nothing to do"
            return 0
        fi
        log "$other ($(criu_version "$other" || true)) fails \`criu check\`: $(grep -m1 -i error <<<"$CHECK_OUTPUT" || tail -n1 <<<"$CHECK_OUTPUT")"
    fi
    return 1
}

install_binary() {
    local src=$1
    install -D -m 0755 "$src" "$INSTALL_PATH.corral-new" || return 1
    mv -f "$INSTALL_PATH.corral-new" "$INSTALL_PATH"
}

# Step 2: the binary built by an earlier run.
cached_binary() {
    printf '%s/criu-%s-%s\n' "$CACHE_DIR" "$CRIU_UPSTREAM_VERSION" "${CRIU_TARBALL_SHA256:0:16}"
}

install_cached_binary() {
    local bin
    bin=$(cached_binary)
    [[ -x "$bin" && -f "$bin.sha256" ]] || return 1
    if ! (cd "$CACHE_DIR" && sha256sum --quiet -c "$bin.sha256" >/dev/null 2>&1); then
        warn "cached $bin does not match its checksum; rebuilding"
        rm -f -- "$bin" "$bin.sha256"
        return 1
    fi
    if ! criu_check "$bin"; then
        warn "cached $bin fails \`criu check\` (libraries changed?); rebuilding:"
        printf '%s\n' "$CHECK_OUTPUT" | sed 's/^/    /' >&2
        return 1
    fi
    install_binary "$bin" || die "cannot install $bin to $INSTALL_PATH"
    criu_check "$INSTALL_PATH" || die "$INSTALL_PATH fails \`criu check\` after install"
    finish "$INSTALL_PATH" "installed from the build cache"
}

# Step 3: Debian's packaged criu, tested from its .deb without installing it.
debian_package_ok() {
    local candidate installed
    candidate=$(apt-cache policy criu 2>/dev/null | awk '/Candidate:/ { print $2; exit }')
    if [[ -z "$candidate" || "$candidate" == "(none)" ]]; then
        apt_update
        candidate=$(apt-cache policy criu 2>/dev/null | awk '/Candidate:/ { print $2; exit }')
    fi
    if [[ -z "$candidate" || "$candidate" == "(none)" ]]; then
        log "Debian offers no criu package here"
        return 1
    fi
    if [[ "${candidate%%-*}" != "$CRIU_UPSTREAM_VERSION" ]]; then
        log "Debian's criu $candidate is not the pinned $CRIU_UPSTREAM_VERSION: not used"
        return 1
    fi
    installed=$(dpkg-query -W -f='${Version}' criu 2>/dev/null || true)
    if [[ "$installed" == "$candidate" ]]; then
        log "Debian's criu $candidate is installed and fails \`criu check\` (see above)"
        return 1
    fi
    local dir
    make_tmp_dir
    dir=$TMP_DIR/deb
    mkdir -p "$dir" || die "mkdir $dir failed"
    chown _apt "$dir" 2>/dev/null || true
    if ! (cd "$dir" && "${APT_GET[@]}" -qq download "criu=$candidate" >/dev/null 2>&1); then
        warn "could not download Debian's criu $candidate to test it; skipping it"
        return 1
    fi
    local debs=("$dir"/criu_*.deb) deb
    deb=${debs[0]}
    [[ -f "$deb" ]] || return 1
    # Its shared libraries, so the unpacked binary can run.
    local libs=()
    mapfile -t libs < <(dpkg-deb -f "$deb" Depends | tr ',' '\n' \
        | sed -E 's/\|.*//; s/\(.*\)//; s/:any//; s/[[:space:]]//g' | grep -E '^lib' | grep -v '^libc6$' || true)
    if ((${#libs[@]})); then apt_install_missing "${libs[@]}"; fi
    dpkg-deb -x "$deb" "$dir/root" || die "cannot unpack $deb"
    if criu_check "$dir/root/usr/sbin/criu"; then
        log "Debian's criu $candidate passes \`criu check\` here: installing the package"
        apt_install_missing criu
        if [[ -e "$INSTALL_PATH" ]]; then
            # It failed its check above and would shadow /usr/sbin/criu.
            log "moving the failing $INSTALL_PATH aside to $INSTALL_PATH.disabled"
            mv -f "$INSTALL_PATH" "$INSTALL_PATH.disabled" || die "cannot move $INSTALL_PATH aside"
        fi
        criu_check /usr/sbin/criu || die "/usr/sbin/criu fails \`criu check\` after install"
        finish /usr/sbin/criu "installed Debian's package"
        return 0
    fi
    log "Debian's criu $candidate fails \`criu check\` here: $(grep -m1 -i error <<<"$CHECK_OUTPUT" || tail -n1 <<<"$CHECK_OUTPUT")"
    return 1
}

# Step 4a: the source tarball, from cache or from Debian's source suite.
tarball_ok() {
    [[ -f "$1" ]] && [[ "$(sha256sum "$1" | cut -d' ' -f1)" == "$CRIU_TARBALL_SHA256" ]]
}

fetch_tarball() {
    local dest=$CACHE_DIR/$CRIU_TARBALL
    if tarball_ok "$dest"; then
        log "source tarball cached: $dest"
        return 0
    fi
    [[ -f "$dest" ]] && { warn "cached $dest has the wrong sha256; fetching it again"; rm -f -- "$dest"; }

    apt_install_missing "${FETCH_DEPS[@]}"
    [[ -f "$ARCHIVE_KEYRING" ]] || die "$ARCHIVE_KEYRING is missing (package debian-archive-keyring)"
    local mirror dir
    mirror=$(debian_mirror)
    make_tmp_dir
    dir=$TMP_DIR/src
    mkdir -p "$dir/lists/partial" "$dir/cache/archives/partial" "$dir/download"
    chown -R _apt "$dir/lists" "$dir/download" 2>/dev/null || true
    local suite
    for suite in $CRIU_SOURCE_SUITE; do
        printf 'deb-src [signed-by=%s] %s %s main\n' "$ARCHIVE_KEYRING" "$mirror" "$suite"
    done >"$dir/sources.list"
    # Only this source list, and indexes and caches in the temporary
    # directory: nothing of the host's apt state is read or written.
    local src_opts=(
        -o "Dir::Etc::SourceList=$dir/sources.list"
        -o Dir::Etc::SourceParts=/dev/null
        -o "Dir::State::Lists=$dir/lists"
        -o "Dir::Cache=$dir/cache")
    local apt_src=("${APT_GET[@]}" "${src_opts[@]}")

    log "fetching the $CRIU_SOURCE_SUITE source index from $mirror (temporary, host apt config untouched)"
    "${apt_src[@]}" -qq update >"$dir/update.log" 2>&1 \
        || { cat "$dir/update.log" >&2; die "apt-get update of the temporary $CRIU_SOURCE_SUITE source list failed"; }

    log "downloading criu $CRIU_DEBIAN_SOURCE_VERSION source (apt's exit code is ignored: only the hash counts)"
    (cd "$dir/download" && "${apt_src[@]}" source --download-only "criu=$CRIU_DEBIAN_SOURCE_VERSION") \
        >"$dir/source.log" 2>&1 || true
    local got=$dir/download/$CRIU_TARBALL
    if [[ ! -f "$got" ]]; then
        # The same upstream tarball is shared by every Debian revision 4.2.1-N.
        local v
        for v in $(apt-cache "${src_opts[@]}" showsrc criu 2>/dev/null \
                | awk '/^Version:/ { print $2 }' | grep -F "$CRIU_UPSTREAM_VERSION-" || true); do
            [[ "$v" == "$CRIU_DEBIAN_SOURCE_VERSION" ]] && continue
            log "criu=$CRIU_DEBIAN_SOURCE_VERSION gave no tarball; trying criu=$v"
            (cd "$dir/download" && "${apt_src[@]}" source --download-only "criu=$v") >>"$dir/source.log" 2>&1 || true
            [[ -f "$got" ]] && break
        done
    fi
    if [[ ! -f "$got" ]]; then
        sed 's/^/    /' "$dir/source.log" >&2
        die "$CRIU_TARBALL was not downloaded from $mirror ($CRIU_SOURCE_SUITE source suite)"
    fi
    local sum
    sum=$(sha256sum "$got" | cut -d' ' -f1)
    if [[ "$sum" != "$CRIU_TARBALL_SHA256" ]]; then
        die "$CRIU_TARBALL has sha256 $sum, expected $CRIU_TARBALL_SHA256: refusing to build it"
    fi
    log "sha256 OK: $sum"
    mv -f "$got" "$dest.part"
    mv -f "$dest.part" "$dest"
}

# Step 4b: build and install.
build_and_install() {
    fetch_tarball
    apt_install_missing "${BUILD_DEPS[@]}" "${RUNTIME_DEPS[@]}"

    local build_dir=$CACHE_DIR/build-${CRIU_TARBALL_SHA256:0:16}
    local src_dir=$build_dir/criu-$CRIU_UPSTREAM_VERSION
    local build_log=$build_dir/build.log
    if [[ ! -f "$src_dir/Makefile" ]]; then
        # Unpack beside it and rename, so an interrupted unpack never
        # looks like a source tree.
        rm -rf -- "$build_dir" "$build_dir.unpack"
        mkdir -p "$build_dir.unpack"
        tar -xJf "$CACHE_DIR/$CRIU_TARBALL" -C "$build_dir.unpack" \
            || die "cannot unpack $CACHE_DIR/$CRIU_TARBALL"
        [[ -f "$build_dir.unpack/criu-$CRIU_UPSTREAM_VERSION/Makefile" ]] \
            || die "unexpected tarball layout: no criu-$CRIU_UPSTREAM_VERSION/Makefile"
        mv "$build_dir.unpack" "$build_dir"
    fi
    local jobs
    jobs=$(nproc 2>/dev/null || echo 2)
    log "building criu $CRIU_UPSTREAM_VERSION (make -j$jobs criu) in $src_dir; log: $build_log"
    local start=$SECONDS
    # Build with Debian's toolchain and a plain environment: the build runs
    # helper scripts, and a user's CFLAGS/LDFLAGS or a non-Debian python on
    # PATH (pyenv) have no business in it.
    if ! env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
            HOME="${HOME:-/root}" LC_ALL=C \
            make -C "$src_dir" -j"$jobs" criu >"$build_log" 2>&1; then
        tail -n 40 "$build_log" | sed 's/^/    /' >&2
        die "building criu failed (full log: $build_log)"
    fi
    log "built in $((SECONDS - start)) s"
    local built=$src_dir/criu/criu
    [[ -x "$built" ]] || die "build finished but $built is missing"

    ensure_loopback_up
    if ! criu_check "$built"; then
        printf '%s\n' "$CHECK_OUTPUT" | sed 's/^/    /' >&2
        die "the freshly built criu fails \`criu check\` on this kernel"
    fi
    local cached
    cached=$(cached_binary)
    install -m 0755 "$built" "$cached.part"
    mv -f "$cached.part" "$cached"
    (cd "$CACHE_DIR" && sha256sum "$(basename "$cached")" >"$cached.sha256")
    install_binary "$cached"
    criu_check "$INSTALL_PATH" || die "$INSTALL_PATH fails \`criu check\` after install"
    finish "$INSTALL_PATH" "built and installed"
}

main() {
    [[ $(id -u) -eq 0 ]] || die "must run as root"
    ensure_loopback_up
    existing_criu_ok && return 0

    mkdir -p "$CACHE_DIR"
    exec 9>"$CACHE_DIR/.lock"
    flock -w 900 9 || die "another install-criu.sh holds $CACHE_DIR/.lock"
    # Another run may have finished while we waited.
    if [[ -x "$INSTALL_PATH" ]] && recent_enough "$INSTALL_PATH" && criu_check "$INSTALL_PATH"; then
        finish "$INSTALL_PATH" "installed by a concurrent run"
        return 0
    fi

    # CRIU needs these whichever binary ends up installed.
    apt_install_missing "${RUNTIME_DEPS[@]}"
    ensure_loopback_up

    install_cached_binary && return 0
    debian_package_ok && return 0
    build_and_install
}

main "$@"
