#!/usr/bin/env bash
# Run molecule scenarios: every molecule/<name>/molecule.yml but the default stub (no argument) or the ones named.
#   scripts/molecule.sh [scenario[@distro]...]   (make molecule [S=<scenario>]; backup@bookworm: Debian 12 app host)
# Prepares the machine first (scripts/molecule-prepare.sh: podman, cached images, apt mirror),
# prints the elapsed time of each scenario and exits non-zero when any of them failed
# (the others still run). MOLECULE_ARGS is passed to `molecule test` (e.g. --destroy=never).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export PATH="$ROOT/.venv/bin:$PATH"
export ANSIBLE_COLLECTIONS_PATH=${ANSIBLE_COLLECTIONS_PATH:-$ROOT/.build/collections}
export ANSIBLE_FORCE_COLOR=${ANSIBLE_FORCE_COLOR:-false}
export PY_COLORS=${PY_COLORS:-0}
[ -e "$ROOT/.build/collections/ansible_collections/baileys/resilience" ] || {
    mkdir -p "$ROOT/.build/collections/ansible_collections/baileys"
    ln -sfn "$ROOT" "$ROOT/.build/collections/ansible_collections/baileys/resilience"
}

if [ $# -gt 0 ]; then
    scenarios=("$@")
else
    scenarios=()
    for f in molecule/*/molecule.yml; do
        [ -e "$f" ] || continue
        s=$(basename "$(dirname "$f")")
        [ "$s" = default ] && continue  # a stub that keeps molecule quiet, not a test (see its molecule.yml)
        scenarios+=("$s")
    done
    # Debian 12 (bookworm) app hosts too, where the platform matters: the host command's runtime, the
    # PostgreSQL 18 client's packages, Node for the service; the other scenarios add nothing platform-specific
    scenarios+=(backup@bookworm emergency_rollback@bookworm)
fi
if [ ${#scenarios[@]} -eq 0 ]; then
    echo "molecule: no scenario under molecule/" >&2
    exit 0
fi
for s in "${scenarios[@]}"; do
    [ -f "molecule/${s%@*}/molecule.yml" ] || { echo "molecule: no scenario molecule/${s%@*}/molecule.yml" >&2; exit 2; }
done

t0=$SECONDS
bash scripts/molecule-prepare.sh
prep=$((SECONDS - t0))

results=()
failed=0
# A scenario name may end in @<distro> (backup@bookworm): the same scenario with its app host on that
# distribution's image (BAILEYS_TEST_DISTRO, read by the scenario's molecule.yml, playbooks and verifier).
for s in "${scenarios[@]}"; do
    echo "==> molecule test -s $s"
    ts=$SECONDS
    distro=trixie
    [ "$s" != "${s%@*}" ] && distro=${s#*@}
    # shellcheck disable=SC2086
    if BAILEYS_TEST_DISTRO=$distro molecule test -s "${s%@*}" ${MOLECULE_ARGS:-}; then
        status=ok
    else
        status=FAILED
        failed=1
    fi
    dt=$((SECONDS - ts))
    results+=("$(printf '%-24s %-6s %4dm%02ds' "$s" "$status" $((dt / 60)) $((dt % 60)))")
    echo "<== $s: $status in $((dt / 60))m$((dt % 60))s"
done

echo "---- molecule summary"
printf '%-24s %-6s %4dm%02ds\n' "(prepare)" ok $((prep / 60)) $((prep % 60))
printf '%s\n' "${results[@]}"
total=$((SECONDS - t0))
printf '%-24s %-6s %4dm%02ds\n' "total" "$([ $failed = 0 ] && echo ok || echo FAILED)" $((total / 60)) $((total % 60))
exit $failed
