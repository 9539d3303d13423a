#!/bin/sh
# Run once by the postgres image when it creates its cluster (mounted in
# /docker-entrypoint-initdb.d by docker/compose.yaml): the node's own role, with no
# superuser, CREATEDB, CREATEROLE or replication rights, owning the node's
# database, which no other role may connect to. The node creates its tables there
# at start-up. The cluster's superuser (POSTGRES_USER) stays for administration.
#
# The image runs an executable script and sources one that is not (the mode a
# mount keeps depends on how it is mounted), so this sets no shell options and
# never exits; on an error psql exits non-zero and the image stops the
# initialisation. The password is read by psql itself (\set with a backquoted
# command), so it is never on a command line; statements that fail are not
# logged with their text (log_min_error_statement), so it is not in the log either.
psql -v ON_ERROR_STOP=1 --no-psqlrc --username "$POSTGRES_USER" --dbname postgres \
    -v role="$ITMOLINK_DB_ROLE" -v db="$ITMOLINK_DB_NAME" <<'SQL'
SET log_min_error_statement = panic;
\set password `cat "$ITMOLINK_DB_PASSWORD_FILE"`
CREATE ROLE :"role" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS
    PASSWORD :'password';
\unset password
CREATE DATABASE :"db" OWNER :"role";
REVOKE ALL ON DATABASE :"db" FROM PUBLIC;
GRANT CONNECT, TEMPORARY ON DATABASE :"db" TO :"role";
SQL
