#!/bin/sh
# The mysqld-exporter's MySQL user: process list, replication status and performance_schema only.
# Run once by the mysql image's entrypoint from /docker-entrypoint-initdb.d (empty data volume),
# while the temporary init server listens on its socket. Needs MYSQL_ROOT_PASSWORD and
# MYSQL_EXPORTER_PASSWORD in the environment (compose.yaml passes both).
set -eu
: "${MYSQL_EXPORTER_PASSWORD:?MYSQL_EXPORTER_PASSWORD is not set}"
MYSQL_PWD="${MYSQL_ROOT_PASSWORD:?MYSQL_ROOT_PASSWORD is not set}" mysql --protocol=socket -uroot <<SQL
CREATE USER IF NOT EXISTS 'exporter'@'%' IDENTIFIED BY '${MYSQL_EXPORTER_PASSWORD}' WITH MAX_USER_CONNECTIONS 3;
GRANT PROCESS, REPLICATION CLIENT ON *.* TO 'exporter'@'%';
GRANT SELECT ON performance_schema.* TO 'exporter'@'%';
SQL
