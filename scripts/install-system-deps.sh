#!/usr/bin/env bash
# Install what `make test` needs from Debian on a fresh machine (root), only what is missing.
set -euo pipefail
need=()
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || need+=(postgresql)
command -v psql >/dev/null || need+=(postgresql-client)
command -v pg_dump >/dev/null || need+=(postgresql-client)
command -v node >/dev/null || need+=(nodejs)
command -v npm >/dev/null || need+=(npm)
command -v zstd >/dev/null || need+=(zstd)
command -v runuser >/dev/null || need+=(util-linux)
command -v crontab >/dev/null || need+=(cron)
command -v promtool >/dev/null || need+=(prometheus)  # promtool: rule checks and rule unit tests
command -v shellcheck >/dev/null || need+=(shellcheck)  # ansible-test sanity's shellcheck test (skipped without it)
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "missing system packages: ${need[*]} (run as root or install them)" >&2
        exit 1
    fi
    echo "installing: ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# the distro's postgresql package starts a cluster we do not use; tests run their own
