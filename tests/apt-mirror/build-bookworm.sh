#!/usr/bin/env bash
# Build the PostgreSQL 18 client packages of the mirror's bookworm-pgdg suite (called by build.sh).
#   usage: tests/apt-mirror/build-bookworm.sh DEBDIR
# Debian has no PostgreSQL 18 for bookworm and sid's binaries need libc6 >= 2.38 (bookworm: 2.36),
# so libpq5 and postgresql-client-18 are rebuilt on bookworm (in the cached bookworm image, podman)
# from Debian sid's postgresql-18 source package: Debian's patches, configure flags (its
# postgresql.mk), .install files, symbols and maintainer scripts, versioned <sid version>.pgdg12+baileys1
# like PGDG's <version>.pgdg12+N. Only the client is compiled: debian/control is cut down to libpq5
# and postgresql-client-18 and debian/rules replaced by bookworm-client.rules (a full package build
# compiles the server and contrib too: it was still in the backend after 5 minutes on 2 cores).
# postgresql-client-common (arch all, deps netbase and perl) is taken from sid as is.
# Output: DEBDIR/{libpq5,postgresql-client-18,postgresql-client-common}_*.deb.
# Cached: rebuilt only when this script or bookworm-client.rules changes (their hash is in
# DEBDIR/.build-hash) or BAILEYS_FORCE_REBUILD is set. Needs network (Debian sid + bookworm).
set -euo pipefail
OUT=${1:?usage: $0 DEBDIR}
HERE=$(cd "$(dirname "$0")" && pwd)
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
IMAGE=${BAILEYS_BOOKWORM_BUILD_IMAGE:-localhost/baileys-resilience/bookworm:latest}
JOBS=${BAILEYS_BUILD_JOBS:-$(nproc)}
HASH=$( (cat "$0" "$HERE/bookworm-client.rules"; echo "$DEBIAN_MIRROR $IMAGE") | sha256sum | cut -c1-16)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
if [ -z "${BAILEYS_FORCE_REBUILD:-}" ] && [ "$(cat "$OUT/.build-hash" 2>/dev/null)" = "$HASH" ] \
    && ls "$OUT"/postgresql-client-18_*.deb "$OUT"/libpq5_*.deb >/dev/null 2>&1; then
    echo "apt-mirror: bookworm client packages in $OUT are cached" >&2
    exit 0
fi
t0=$SECONDS
echo "apt-mirror: building PostgreSQL 18 client packages for bookworm (takes minutes)" >&2
rm -rf "$OUT.new"
mkdir -p "$OUT.new"
cp "$HERE/bookworm-client.rules" "$OUT.new/.rules"
podman run --rm --network host -v "$OUT.new:/out:Z" \
    -e "DEBIAN_MIRROR=$DEBIAN_MIRROR" -e "JOBS=$JOBS" \
    "$IMAGE" bash -euo pipefail -c '
export DEBIAN_FRONTEND=noninteractive
echo "Acquire::Check-Valid-Until \"false\";" > /etc/apt/apt.conf.d/90no-valid-until
printf "deb %s sid main\ndeb-src %s sid main\n" "$DEBIAN_MIRROR" "$DEBIAN_MIRROR" > /etc/apt/sources.list.d/sid.list
printf "Package: *\nPin: release n=sid\nPin-Priority: 100\n" > /etc/apt/preferences.d/sid.pref
apt-get update -qq
# postgresql-common-dev (postgresql.mk) is not in bookworm; /sid for it alone, its deps from bookworm
apt-get install -y -qq dpkg-dev postgresql-common-dev/sid >/dev/null
mkdir /build && cd /build
apt-get -o APT::Sandbox::User=root source -qq postgresql-18 >/dev/null
cd postgresql-18-*/
ver=$(dpkg-parsechangelog -S Version)
new="$ver.pgdg12+baileys1"
{
  printf "postgresql-18 (%s) bookworm-pgdg; urgency=medium\n\n" "$new"
  printf "  * Client-only rebuild of Debian %s for bookworm (baileys.resilience test mirror).\n\n" "$ver"
  printf " -- baileys.resilience tests <pgdg-test@example.invalid>  %s\n\n" "$(dpkg-parsechangelog -S Date)"
  cat debian/changelog
} > /tmp/changelog
mv /tmp/changelog debian/changelog
awk -v RS= -v ORS="\n\n" "NR == 1 || /^Package: (libpq5|postgresql-client-18)\n/" debian/control > /tmp/control
mv /tmp/control debian/control
test "$(grep -c ^Package: debian/control)" = 2
install -m 0755 /out/.rules debian/rules
profiles=nocheck,nodoc,pkg.postgresql.nollvm
apt-get build-dep -y -qq --build-profiles=$profiles . >/dev/null
export DEB_BUILD_OPTIONS="nocheck nodoc parallel=$JOBS"
echo "apt-mirror: dpkg-buildpackage $new" >&2
if ! dpkg-buildpackage -B -us -uc --build-profiles=$profiles > /tmp/build.log 2>&1; then
    tail -n 40 /tmp/build.log >&2
    exit 1
fi
cd /build
cp libpq5_*.deb postgresql-client-18_*.deb /out/
cd /out
apt-get -o APT::Sandbox::User=root download -qq postgresql-client-common/sid
# smoke test: the new client runs on bookworm against the new libpq
mkdir /tmp/x
for d in libpq5_*.deb postgresql-client-18_*.deb; do dpkg-deb -x "$d" /tmp/x; done
LD_LIBRARY_PATH=/tmp/x/usr/lib/x86_64-linux-gnu /tmp/x/usr/lib/postgresql/18/bin/pg_dump --version >&2
dpkg-deb -f postgresql-client-18_*.deb Version Depends >&2
rm -f /out/.rules
chmod -R a+rX /out
'
rm -rf "$OUT.old"
mv "$OUT" "$OUT.old"
mv "$OUT.new" "$OUT"
rm -rf "$OUT.old"
echo "$HASH" > "$OUT/.build-hash"
echo "apt-mirror: bookworm client packages built in $((SECONDS - t0))s" >&2
