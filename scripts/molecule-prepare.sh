#!/usr/bin/env bash
# Prepare this machine (Debian 12, root) for the molecule scenarios; fast when everything is cached.
#   1. install podman, runc, debootstrap when missing
#   2. /etc/containers/containers.conf with the settings this kind of sandbox needs
#      (never clobbers a file we did not write: ours carry the MARK header below)
#   3. base images, cached by name and labelled with the hash of what built them:
#        localhost/baileys-resilience/bookworm:latest   Debian 12 minbase + python3
#        localhost/baileys-resilience/trixie:latest     Debian 13 minbase + python3
#        localhost/baileys-resilience/pg18:latest       trixie + PostgreSQL 18 server from sid
#   4. the local PGDG-style apt mirror (tests/apt-mirror/build.sh: suites trixie-pgdg and
#      bookworm-pgdg; the bookworm client is compiled in the bookworm image, ~7 min cold, cached)
#      and the container serving it on the host network (containers reach it as
#      http://host.containers.internal:$MIRROR_PORT)
# Environment: DEBIAN_MIRROR (default http://deb.debian.org/debian), BAILEYS_FORCE_REBUILD=1,
#              BAILEYS_MIRROR_PORT (default 8765).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
IMG_PREFIX=localhost/baileys-resilience
LABEL=org.baileys-resilience.build-hash
MARK="# Written by baileys.resilience scripts/molecule-prepare.sh"
# Outside the checkout, like the images: a new clone of the same machine (CI) reuses what took minutes to build
# (the bookworm client packages, the wheelhouse); anything missing or stale (hash-keyed) is built again.
CACHE=$HOME/.cache/baileys-resilience/molecule  # .config/molecule/config.yml names its wheelhouse
MIRROR_PORT=${BAILEYS_MIRROR_PORT:-8765}
MIRROR_CONTAINER=baileys-pgdg-mirror
mkdir -p "$CACHE"

log() { printf 'molecule-prepare: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---------------------------------------------------------------- 1. packages
need=()
command -v podman >/dev/null || need+=(podman)
command -v runc >/dev/null || need+=(runc)
command -v debootstrap >/dev/null || need+=(debootstrap)
if [ ${#need[@]} -gt 0 ]; then
    [ "$(id -u)" = 0 ] || die "missing ${need[*]}: run as root or install them"
    log "installing ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

# ---------------------------------------------------------------- 2. containers.conf
# No CAP_SYS_RESOURCE in this sandbox: crun and podman's default ulimits fail; no systemd/journald.
CONF=${BAILEYS_CONTAINERS_CONF:-/etc/containers/containers.conf}  # override: tests of this script
want_conf() {
    cat <<EOF
$MARK
# (re-written on every run; remove this header to take the file over, then keep these settings)
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
}
if [ ! -e "$CONF" ] || head -n1 "$CONF" | grep -qxF "$MARK"; then
    if ! want_conf | cmp -s - "$CONF" 2>/dev/null; then
        log "writing $CONF"
        mkdir -p "$(dirname "$CONF")"
        want_conf > "$CONF.tmp" && mv "$CONF.tmp" "$CONF"
    fi
else
    # a file the user wrote: accept it only if it already carries every setting we need
    missing=()
    grep -Eq '^[[:space:]]*runtime[[:space:]]*=[[:space:]]*"runc"' "$CONF" || missing+=('[engine] runtime = "runc"')
    grep -Eq '^[[:space:]]*cgroup_manager[[:space:]]*=[[:space:]]*"cgroupfs"' "$CONF" \
        || missing+=('[engine] cgroup_manager = "cgroupfs"')
    grep -Eq '^[[:space:]]*events_logger[[:space:]]*=[[:space:]]*"file"' "$CONF" \
        || missing+=('[engine] events_logger = "file"')
    grep -Eq '^[[:space:]]*default_ulimits[[:space:]]*=.*nofile=1024:1024' "$CONF" \
        || missing+=('[containers] default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]')
    if [ ${#missing[@]} -gt 0 ]; then
        log "$CONF exists and was not written by this script; refusing to change it."
        log "Add these settings to it yourself (or delete it and re-run):"
        for m in "${missing[@]}"; do log "    $m"; done
        exit 1
    fi
fi

# ---------------------------------------------------------------- 3. images
hash_of() { cat "$@" | sha256sum | cut -c1-16; }
image_current() { # name hash
    podman image exists "$1" || return 1
    [ -n "${BAILEYS_FORCE_REBUILD:-}" ] && return 1
    [ "$(podman image inspect --format "{{ index .Labels \"$LABEL\" }}" "$1")" = "$2" ]
}

build_base() { # suite
    local suite=$1 name=$IMG_PREFIX/$1:latest h t0 dir
    # the base image depends on this script's base-image section only (kept stable on purpose)
    h=$(printf '%s\n' "base-v1" "$suite" "$DEBIAN_MIRROR" | sha256sum | cut -c1-16)
    if image_current "$name" "$h"; then log "$name is cached"; return; fi
    t0=$SECONDS
    log "building $name (debootstrap --variant=minbase $suite)"
    dir=$(mktemp -d /var/tmp/baileys-rootfs.XXXXXX)
    # shellcheck disable=SC2064
    trap "rm -rf '$dir'" RETURN
    debootstrap --variant=minbase --include=python3,ca-certificates "$suite" "$dir" "$DEBIAN_MIRROR" \
        > "$CACHE/debootstrap-$suite.log" 2>&1 || { tail -n 30 "$CACHE/debootstrap-$suite.log" >&2; die "debootstrap $suite failed"; }
    printf 'deb %s %s main\n' "$DEBIAN_MIRROR" "$suite" > "$dir/etc/apt/sources.list"
    printf 'APT::Install-Recommends "false";\n' > "$dir/etc/apt/apt.conf.d/90baileys-norecommends"
    rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/* "$dir"/var/log/*.log
    tar -C "$dir" --numeric-owner -c . \
        | podman import --quiet --change "LABEL $LABEL=$h" --change 'CMD ["sleep", "infinity"]' \
            --change 'ENV LANG=C.UTF-8' - "$name" >/dev/null
    log "built $name in $((SECONDS - t0))s"
}

build_pg18() {
    local name=$IMG_PREFIX/pg18:latest h t0 base_id
    base_id=$(podman image inspect --format '{{.Id}}' "$IMG_PREFIX/trixie:latest")
    h=$( (cat tests/images/pg18/Containerfile tests/images/pg18/entrypoint.sh; echo "$base_id") | sha256sum | cut -c1-16)
    if image_current "$name" "$h"; then log "$name is cached"; return; fi
    t0=$SECONDS
    log "building $name (PostgreSQL 18 from Debian sid)"
    podman build --quiet --network=host --label "$LABEL=$h" \
        --build-arg "BASE=$IMG_PREFIX/trixie:latest" --build-arg "MIRROR=$DEBIAN_MIRROR" \
        -t "$name" tests/images/pg18 > "$CACHE/build-pg18.log" 2>&1 \
        || { tail -n 30 "$CACHE/build-pg18.log" >&2; die "building $name failed"; }
    log "built $name in $((SECONDS - t0))s"
}

build_base bookworm
build_base trixie
build_pg18

# ---------------------------------------------------------------- 4. apt mirror
# needs the bookworm image (bookworm-pgdg is built in it) and the trixie image (the rest): built above
DEBIAN_MIRROR=$DEBIAN_MIRROR bash tests/apt-mirror/build.sh "$CACHE/apt-mirror"
# The serving container is (re)created when it does not answer, or when the port, the repository or
# the checkout it serves changed. Podman's own "running" state is not trusted: on a machine restored
# from a snapshot it reports a container as up whose process is long gone.
mirror_id="$MIRROR_PORT-$(cat "$CACHE/apt-mirror/.build-hash")-$CACHE"
mirror_answers() {
    python3 - "$MIRROR_PORT" 2>/dev/null <<'EOF'
import sys, urllib.request
urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/pgdg-test.asc", timeout=1).read()
EOF
}
if ! podman container exists "$MIRROR_CONTAINER" \
    || [ "$(podman container inspect --format "{{ index .Config.Labels \"$LABEL\" }}" "$MIRROR_CONTAINER")" \
         != "$mirror_id" ] \
    || ! mirror_answers; then
    podman rm -f -t 0 "$MIRROR_CONTAINER" >/dev/null 2>&1 || true
    if podman container exists "$MIRROR_CONTAINER"; then
        die "cannot remove the stale container $MIRROR_CONTAINER (podman rm -f $MIRROR_CONTAINER)"
    fi
    if mirror_answers; then
        die "port $MIRROR_PORT already serves something else; set BAILEYS_MIRROR_PORT to a free port"
    fi
    log "starting $MIRROR_CONTAINER on port $MIRROR_PORT (host network)"
    podman run -d --name "$MIRROR_CONTAINER" --network host \
        --label "$LABEL=$mirror_id" -v "$CACHE/apt-mirror/repo:/srv:ro,Z" \
        "$IMG_PREFIX/trixie:latest" python3 -m http.server "$MIRROR_PORT" --directory /srv >/dev/null
fi
ready=false
for _ in $(seq 1 100); do
    if mirror_answers; then ready=true; break; fi
    sleep 0.2
done
if [ "$ready" != true ]; then
    podman logs --tail 20 "$MIRROR_CONTAINER" >&2 || true
    die "the apt mirror container $MIRROR_CONTAINER does not answer on http://127.0.0.1:$MIRROR_PORT/"
fi

# ---------------------------------------------------------------- 5. wheelhouse
# The test containers reach the package index only through this sandbox's TLS proxy, whose CA they do not
# trust; the cli role's offline path (cli_wheelhouse: a controller directory copied to the host, pip --no-index)
# is what the scenarios use: every pinned wheel for CPython 3.11 (Debian 12) and 3.13 (Debian 13), x86_64.
# Rebuilt only when the pins change (their hash in .build-hash).
WHEELS=$CACHE/wheelhouse
REQS=roles/cli/files/requirements
wheels_hash=$(cat "$REQS"/*.txt | sha256sum | cut -c1-16)
if [ "$(cat "$WHEELS/.build-hash" 2>/dev/null)" != "$wheels_hash" ]; then
    log "building the wheelhouse $WHEELS (CPython 3.11 and 3.13) from $REQS/all.txt"
    rm -rf "$WHEELS.new"
    mkdir -p "$WHEELS.new"
    for pyver in 3.11 3.13; do
        PIP_FIND_LINKS='' "$ROOT/.venv/bin/python" -m pip download --quiet --disable-pip-version-check \
            -r "$REQS/all.txt" -d "$WHEELS.new" --only-binary=:all: --python-version "$pyver" \
            --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux_2_28_x86_64 \
            || die "cannot download the wheels for CPython $pyver (package index reachable?)"
    done
    echo "$wheels_hash" > "$WHEELS.new/.build-hash"
    rm -rf "$WHEELS"
    mv "$WHEELS.new" "$WHEELS"
fi
log "ready: images $IMG_PREFIX/{bookworm,trixie,pg18}:latest, mirror http://host.containers.internal:$MIRROR_PORT, wheelhouse $WHEELS"
