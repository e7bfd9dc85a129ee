#!/bin/sh
# The mysqld-exporter's MySQL user: process list, replication status and performance_schema only.
# Run once by the mysql image's entrypoint from /docker-entrypoint-initdb.d (empty data volume),
# while the temporary init server listens on its socket. Needs MYSQL_ROOT_PASSWORD and
# MYSQL_EXPORTER_PASSWORD in the environment (compose.yaml passes both); MYSQL_EXPORTER_USER
# defaults to exporter, the name compose.yaml gives mysqld-exporter.
set -eu
: "${MYSQL_EXPORTER_PASSWORD:?MYSQL_EXPORTER_PASSWORD is not set}"
user="${MYSQL_EXPORTER_USER:-exporter}"
MYSQL_PWD="${MYSQL_ROOT_PASSWORD-}" mysql --protocol=socket -uroot <<SQL
CREATE USER IF NOT EXISTS '${user}'@'%' IDENTIFIED BY '${MYSQL_EXPORTER_PASSWORD}' WITH MAX_USER_CONNECTIONS 3;
GRANT PROCESS, REPLICATION CLIENT ON *.* TO '${user}'@'%';
GRANT SELECT ON performance_schema.* TO '${user}'@'%';
SQL
