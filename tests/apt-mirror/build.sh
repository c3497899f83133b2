#!/usr/bin/env bash
# Build the local PGDG-style apt repository the molecule scenarios install PostgreSQL 18 from.
#   usage: tests/apt-mirror/build.sh OUTDIR        (scripts/molecule-prepare.sh uses ~/.cache/baileys-resilience/molecule/apt-mirror)
# Layout (OUTDIR/repo is what gets served over HTTP; OUTDIR/gnupg holds the signing key and is not):
#   repo/pgdg-test.asc                          public key (ASCII armored) -> pg_client_key
#   repo/dists/{trixie,bookworm}-pgdg/{Release,InRelease,Release.gpg,main/binary-amd64/Packages{,.gz}}
#   repo/pool/main/*.deb                        trixie-pgdg: postgresql-client-18, libpq5,
#                                               postgresql-client-common from Debian sid, plus whatever
#                                               of their dependencies trixie lacks (computed by apt,
#                                               not hard-coded)
#   repo/pool/bookworm-pgdg/main/*.deb          bookworm-pgdg: libpq5 and postgresql-client-18 rebuilt
#                                               on bookworm from sid's postgresql-18 source, and sid's
#                                               postgresql-client-common (build-bookworm.sh; sid's
#                                               binaries need libc6 >= 2.38, bookworm has 2.36)
#   bookworm-debs/                              build-bookworm.sh's output, cached on its own hash
# The Release files say Origin: apt.postgresql.org like the real PGDG ones, so the role's pinning
# is exercised unchanged (Suite/Codename <codename>-pgdg, as the role's pg_client_suite).
# Cached: rebuilt only when this script, build-bookworm.sh or bookworm-client.rules changes (their
# hash is in OUTDIR/.build-hash) or BAILEYS_FORCE_REBUILD is set. Runs inside the cached trixie
# image (podman), needs network. The bookworm compile (minutes) is cached separately in
# OUTDIR/bookworm-debs/.build-hash: changing this script alone only re-downloads and re-signs.
set -euo pipefail
OUT=${1:?usage: $0 OUTDIR}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
IMAGE=${BAILEYS_MIRROR_BUILD_IMAGE:-localhost/baileys-resilience/trixie:latest}
SUITE=trixie-pgdg
BOOKWORM_SUITE=bookworm-pgdg
PACKAGES="postgresql-client-18 libpq5 postgresql-client-common"
HERE=$(cd "$(dirname "$0")" && pwd)
HASH=$( (cat "$0" "$HERE/build-bookworm.sh" "$HERE/bookworm-client.rules"; echo "$DEBIAN_MIRROR $IMAGE") \
    | sha256sum | cut -c1-16)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
if [ -z "${BAILEYS_FORCE_REBUILD:-}" ] && [ -s "$OUT/repo/dists/$SUITE/InRelease" ] \
    && [ -s "$OUT/repo/dists/$BOOKWORM_SUITE/InRelease" ] \
    && [ "$(cat "$OUT/.build-hash" 2>/dev/null)" = "$HASH" ]; then
    echo "apt-mirror: $OUT/repo is cached" >&2
    exit 0
fi
t0=$SECONDS
DEBIAN_MIRROR=$DEBIAN_MIRROR bash "$HERE/build-bookworm.sh" "$OUT/bookworm-debs"
echo "apt-mirror: building $OUT/repo ($SUITE: $PACKAGES from sid; $BOOKWORM_SUITE)" >&2
rm -rf "$OUT/repo.new"
mkdir -p "$OUT/repo.new" "$OUT/gnupg"
podman run --rm --network host -v "$OUT:/out:Z" \
    -e "DEBIAN_MIRROR=$DEBIAN_MIRROR" -e "SUITE=$SUITE" -e "PACKAGES=$PACKAGES" \
    -e "BOOKWORM_SUITE=$BOOKWORM_SUITE" \
    "$IMAGE" bash -euo pipefail -c '
export DEBIAN_FRONTEND=noninteractive
echo "Acquire::Check-Valid-Until \"false\";" > /etc/apt/apt.conf.d/90no-valid-until
printf "deb %s sid main\n" "$DEBIAN_MIRROR" > /etc/apt/sources.list.d/sid.list
printf "Package: *\nPin: release n=sid\nPin-Priority: 100\n" > /etc/apt/preferences.d/sid.pref
apt-get update -qq
apt-get install -y -qq apt-utils gnupg >/dev/null
# what installing the sid packages on trixie needs from sid: apt picks the rest from trixie
sel=""
for p in $PACKAGES; do sel="$sel $p/sid"; done
apt-get install -s $sel 2>/dev/null \
  | sed -nE "s/^Inst ([^ ]+) (\[[^]]*\] )?\(([^ ]+) ([^[]*)\[.*/\1=\3 \4/p" \
  | awk "/unstable/ {print \$1}" > /tmp/pkgs
echo "apt-mirror: from sid: $(tr "\n" " " < /tmp/pkgs)" >&2
test -s /tmp/pkgs
mkdir -p /out/repo.new/pool/main "/out/repo.new/dists/$SUITE/main/binary-amd64"
cd /out/repo.new/pool/main
xargs apt-get -o APT::Sandbox::User=root download -qq < /tmp/pkgs
cd /out/repo.new
export GNUPGHOME=/out/gnupg
chmod 0700 "$GNUPGHOME"
if ! gpg --batch --list-secret-keys 2>/dev/null | grep -q sec; then
    gpg --batch --quiet --passphrase "" --quick-gen-key \
        "baileys.resilience test PGDG mirror <pgdg-test@example.invalid>" rsa3072 sign never
fi
gpg --batch --armor --export > pgdg-test.asc
mkdir -p "pool/$BOOKWORM_SUITE/main" "dists/$BOOKWORM_SUITE/main/binary-amd64"
cp /out/bookworm-debs/*.deb "pool/$BOOKWORM_SUITE/main/"
echo "apt-mirror: $BOOKWORM_SUITE: $(cd "pool/$BOOKWORM_SUITE/main" && echo *.deb)" >&2
apt-ftparchive packages pool/main > "dists/$SUITE/main/binary-amd64/Packages"
apt-ftparchive packages "pool/$BOOKWORM_SUITE" > "dists/$BOOKWORM_SUITE/main/binary-amd64/Packages"
for SUITE in "$SUITE" "$BOOKWORM_SUITE"; do
    gzip -9nk "dists/$SUITE/main/binary-amd64/Packages"
    apt-ftparchive \
      -o APT::FTPArchive::Release::Origin=apt.postgresql.org \
      -o "APT::FTPArchive::Release::Label=PostgreSQL for Debian/Ubuntu repository" \
      -o APT::FTPArchive::Release::Suite=$SUITE -o APT::FTPArchive::Release::Codename=$SUITE \
      -o APT::FTPArchive::Release::Architectures=amd64 -o APT::FTPArchive::Release::Components=main \
      release "dists/$SUITE" > /tmp/Release
    mv /tmp/Release "dists/$SUITE/Release"
    gpg --batch --yes --clearsign -o "dists/$SUITE/InRelease" "dists/$SUITE/Release"
    gpg --batch --yes -abs -o "dists/$SUITE/Release.gpg" "dists/$SUITE/Release"
done
chmod -R a+rX /out/repo.new
'
rm -rf "$OUT/repo.old"
[ -d "$OUT/repo" ] && mv "$OUT/repo" "$OUT/repo.old"
mv "$OUT/repo.new" "$OUT/repo"
rm -rf "$OUT/repo.old"
echo "$HASH" > "$OUT/.build-hash"
echo "apt-mirror: built in $((SECONDS - t0))s" >&2
