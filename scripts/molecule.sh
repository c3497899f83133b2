#!/usr/bin/env bash
# Run molecule scenarios: every molecule/<name>/molecule.yml but the default stub (no argument) or the ones named.
#   scripts/molecule.sh [scenario[@distro]...]   (make molecule [S=<scenario>]; backup@bookworm: Debian 12 app host)
# Without arguments two pairs of scenarios run side by side (BAILEYS_MOLECULE_PAIRS=0: one at a time); an
# argument a+b runs those two side by side.
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
for step in "${scenarios[@]}"; do
    for s in ${step/+/ }; do
        [ -f "molecule/${s%@*}/molecule.yml" ] || { echo "molecule: no scenario molecule/${s%@*}/molecule.yml" >&2; exit 2; }
    done
done

t0=$SECONDS
bash scripts/molecule-prepare.sh
prep=$((SECONDS - t0))

results=()
failed=0
LOGDIR=$ROOT/.build/molecule-logs
mkdir -p "$LOGDIR"

# run_one <scenario[@distro]>: molecule test, its output to the terminal (or, with a second argument, to that
# file); records "<name> <status> <seconds>" in $LOGDIR/<name>.result.
# A scenario name may end in @<distro> (backup@bookworm): the same scenario with its app host on that
# distribution's image (BAILEYS_TEST_DISTRO, read by the scenario's molecule.yml, playbooks and verifier).
run_one() {
    local s=$1 out=${2:-} ts=$SECONDS distro=trixie status=ok
    [ "$s" != "${s%@*}" ] && distro=${s#*@}
    if [ -n "$out" ]; then
        # shellcheck disable=SC2086
        BAILEYS_TEST_DISTRO=$distro molecule test -s "${s%@*}" ${MOLECULE_ARGS:-} > "$out" 2>&1 || status=FAILED
    else
        # shellcheck disable=SC2086
        BAILEYS_TEST_DISTRO=$distro molecule test -s "${s%@*}" ${MOLECULE_ARGS:-} || status=FAILED
    fi
    echo "$s $status $((SECONDS - ts))" > "$LOGDIR/$s.result"
}

record() {
    local s status dt
    read -r s status dt < "$LOGDIR/$1.result"
    [ "$status" = ok ] || failed=1
    results+=("$(printf '%-24s %-6s %4dm%02ds' "$s" "$status" $((dt / 60)) $((dt % 60)))")
    echo "<== $s: $status in $((dt / 60))m$((dt % 60))s"
}

# A step "a+b" runs two scenarios side by side (their own containers, networks and ports; each one's output
# goes to .build/molecule-logs/<name>.log and is printed when both are done). The default run pairs the scenarios
# whose checks hold on a shared machine; emergency_rollback's recovery and alert times (limits in seconds) run alone.
steps=("${scenarios[@]}")
if [ $# -eq 0 ] && [ "${BAILEYS_MOLECULE_PAIRS:-1}" = 1 ]; then
    steps=()
    rest=" ${scenarios[*]} "
    for pair in backup+pitr s3_replication+backup@bookworm; do
        a=${pair%+*} b=${pair#*+}
        if [[ $rest == *" $a "* && $rest == *" $b "* ]]; then
            steps+=("$pair")
            rest=${rest/ $a / }
            rest=${rest/ $b / }
        fi
    done
    for s in $rest; do steps+=("$s"); done
fi

for step in "${steps[@]}"; do
    if [ "$step" != "${step%+*}" ]; then
        a=${step%+*} b=${step#*+}
        echo "==> molecule test -s $a and -s $b, side by side (logs: $LOGDIR/$a.log, $LOGDIR/$b.log)"
        run_one "$a" "$LOGDIR/$a.log" &
        pa=$!
        run_one "$b" "$LOGDIR/$b.log" &
        pb=$!
        wait $pa || true
        wait $pb || true
        for s in "$a" "$b"; do
            echo "==> molecule test -s $s (output)"
            cat "$LOGDIR/$s.log"
            record "$s"
        done
    else
        echo "==> molecule test -s $step"
        run_one "$step"
        record "$step"
    fi
done

echo "---- molecule summary"
printf '%-24s %-6s %4dm%02ds\n' "(prepare)" ok $((prep / 60)) $((prep % 60))
printf '%s\n' "${results[@]}"
total=$((SECONDS - t0))
printf '%-24s %-6s %4dm%02ds\n' "total" "$([ $failed = 0 ] && echo ok || echo FAILED)" $((total / 60)) $((total % 60))
exit $failed
