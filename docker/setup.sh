#!/bin/sh
# Prepares docker/ for `docker compose up`: key material for LAO and KOR, the
# private keys moved to secrets/, the CA keys moved to offline/ (keep them off the
# servers), and two random PostgreSQL passwords per party: the cluster superuser's
# (db_admin_password, for the database service only) and the node role's
# (db_password, for the database service's initialisation and in the node's libpq
# passfile). Refuses to overwrite existing material.
#
#   ITMOLINK=itmolink ./setup.sh      # ITMOLINK: how to run the itmolink command
set -eu
cd "$(dirname "$0")"
itmolink=${ITMOLINK:-itmolink}
umask 077
for party in LAO KOR; do
    dir=$(echo "$party" | tr 'A-Z' 'a-z')
    if [ -e "$dir/pki/card.toml" ] || [ -e "secrets/$dir" ]; then
        echo "setup.sh: $dir/pki or secrets/$dir already exists; move it away first" >&2
        exit 1
    fi
    # The node certificate names the compose service, so the partner can dial it.
    $itmolink pki init --party "$party" --dir "$dir/pki" \
        --host "$dir" --host localhost --host 127.0.0.1
    mkdir -p "secrets/$dir" "offline/$dir"
    mv "$dir/pki/node.key" "$dir/pki/signing.key" "secrets/$dir/"
    mv "$dir/pki/ca.key" "offline/$dir/"
    od -An -N24 -tx1 /dev/urandom | tr -d ' \n' > "secrets/$dir/db_admin_password"
    password=$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')
    printf '%s' "$password" > "secrets/$dir/db_password"
    # libpq passfile: host:port:database:user:password, for this party's database only.
    printf '%s-db:5432:itmolink:itmolink:%s\n' "$dir" "$password" > "secrets/$dir/pgpass"
    chmod 600 "secrets/$dir"/*
    chmod 644 "$dir/pki/card.toml" "$dir/pki/ca.pem" "$dir/pki/node.pem"
done
# The node runs as uid 10001 in its container: it must own its key directory (it
# writes rotated keys there) and be able to read its secrets (mode 0600). The
# postgres image reads its password files as its user postgres (uid 999).
owners="chown -R 10001:10001 lao/pki kor/pki secrets && chown 999:999 secrets/*/db_admin_password secrets/*/db_password"
if [ "$(id -u)" = 0 ]; then
    sh -c "$owners"
else
    echo "now, in $(pwd), run as root: $owners"
fi
