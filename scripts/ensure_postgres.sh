#!/usr/bin/env bash
# The test suite runs every store-level and integration test on PostgreSQL too, in a
# throwaway cluster it starts itself (tests/pgcluster.py): it needs the server binaries
# (initdb, pg_ctl). Installs Debian's postgresql package when they are missing and we
# are root; otherwise says what to do. ITMOLINK_SKIP_POSTGRES=1 skips this check (the
# PostgreSQL runs are then reported as skipped).
set -euo pipefail
if [ "${ITMOLINK_SKIP_POSTGRES:-}" = "1" ]; then
    exit 0
fi
if [ -n "${ITMOLINK_PG_BINDIR:-}" ] && [ -x "${ITMOLINK_PG_BINDIR}/initdb" ]; then
    exit 0
fi
if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null; then
    exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
    echo "PostgreSQL server binaries missing: installing Debian's postgresql package"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y --no-install-recommends postgresql
    exit 0
fi
echo "The tests need the PostgreSQL server binaries (initdb, pg_ctl): install them" >&2
echo "(Debian: sudo apt-get install postgresql), or set ITMOLINK_SKIP_POSTGRES=1 to skip" >&2
echo "the PostgreSQL runs (they are then reported as skipped)." >&2
exit 1
