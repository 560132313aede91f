#!/bin/bash
# The official mysql image's entrypoint contract, on MariaDB:
# - arguments starting with "-" are mysqld flags; MySQL-only ones MariaDB refuses are dropped;
# - an empty data directory is initialised from MYSQL_ROOT_PASSWORD or MYSQL_ALLOW_EMPTY_PASSWORD
#   (required), MYSQL_ROOT_HOST (default %), MYSQL_DATABASE, MYSQL_USER + MYSQL_PASSWORD (each
#   also as *_FILE), then /docker-entrypoint-initdb.d/*.sh, *.sql, *.sql.gz|xz|zst|bz2 in order;
# - the server runs as user mysql. No secret is ever put on a command line or in a log line.
set -eo pipefail
DATADIR=/var/lib/mysql
SOCKET=/run/mysqld/mysqld.sock
# MySQL 8 flags that MariaDB 10.11 refuses to start with (names with "-"; "_" is the same flag).
MYSQL_ONLY_FLAGS=" default-authentication-plugin authentication-policy mysqlx skip-mysqlx
  mysqlx-port mysqlx-bind-address mysqlx-socket innodb-dedicated-server disable-log-bin
  admin-address admin-port create-admin-listener-thread caching-sha2-password-auto-generate-rsa-keys
  caching-sha2-password-private-key-path caching-sha2-password-public-key-path
  sha256-password-auto-generate-rsa-keys sha256-password-private-key-path
  sha256-password-public-key-path binlog-transaction-compression "

log() { echo "$(date -u +%FT%TZ) [$1] [Entrypoint]: $2"; }
die() { log ERROR "$1" >&2; exit 1; }

# VAR or VAR_FILE (the file's contents), as the official image allows.
file_env() {
  local var=$1 file_var="${1}_FILE" def=${2:-}
  [ -n "${!var:-}" ] && [ -n "${!file_var:-}" ] && die "both $var and $file_var are set (but are exclusive)"
  local val=$def
  if [ -n "${!var:-}" ]; then val=${!var}; elif [ -n "${!file_var:-}" ]; then val=$(<"${!file_var}"); fi
  export "$var"="$val"
  unset "$file_var"
}
sql_string() { local s=${1//\\/\\\\}; printf "'%s'" "${s//\'/\\\'}"; } # a quoted SQL literal
sql_name() { printf '`%s`' "${1//\`/\`\`}"; }                            # a quoted identifier
# SQL from stdin, as root over the socket (root@localhost keeps unix_socket authentication).
docker_process_sql() { mariadb --protocol=socket --socket="$SOCKET" -uroot "$@"; }

run_initdb() {
  local f
  for f in /docker-entrypoint-initdb.d/*; do
    case $f in
      *.sh)
        if [ -x "$f" ]; then log Note "$0: running $f"; "$f"
        else log Note "$0: sourcing $f"; . "$f"; fi ;;
      *.sql) log Note "$0: running $f"; docker_process_sql ${MYSQL_DATABASE:+--database="$MYSQL_DATABASE"} <"$f" ;;
      *.sql.bz2) log Note "$0: running $f"; bunzip2 -c "$f" | docker_process_sql ${MYSQL_DATABASE:+--database="$MYSQL_DATABASE"} ;;
      *.sql.gz) log Note "$0: running $f"; gunzip -c "$f" | docker_process_sql ${MYSQL_DATABASE:+--database="$MYSQL_DATABASE"} ;;
      *.sql.xz) log Note "$0: running $f"; xzcat "$f" | docker_process_sql ${MYSQL_DATABASE:+--database="$MYSQL_DATABASE"} ;;
      *.sql.zst) log Note "$0: running $f"; zstd -dc "$f" | docker_process_sql ${MYSQL_DATABASE:+--database="$MYSQL_DATABASE"} ;;
      */\*) ;; # the directory is empty
      *) log Warn "$0: ignoring $f" ;;
    esac
  done
}

init_datadir() {
  file_env MYSQL_ROOT_PASSWORD
  file_env MYSQL_ROOT_HOST %
  file_env MYSQL_DATABASE
  file_env MYSQL_USER
  file_env MYSQL_PASSWORD
  if [ -n "${MYSQL_RANDOM_ROOT_PASSWORD:-}" ]; then
    die "MYSQL_RANDOM_ROOT_PASSWORD is not supported by this stand-in (it would log the password)"
  fi
  if [ -z "$MYSQL_ROOT_PASSWORD" ] && [ -z "${MYSQL_ALLOW_EMPTY_PASSWORD:-}" ]; then
    die "Database is uninitialized and password option is not specified
    You need to specify one of MYSQL_ROOT_PASSWORD or MYSQL_ALLOW_EMPTY_PASSWORD"
  fi
  log Note "Initializing database files"
  mariadb-install-db --user=mysql --datadir="$DATADIR" --skip-test-db --skip-name-resolve \
    --auth-root-authentication-method=socket >/dev/null
  log Note "Starting temporary server"
  setpriv --reuid=mysql --regid=mysql --init-groups \
    mariadbd "$@" --skip-networking --socket="$SOCKET" &
  local pid=$! i
  for i in $(seq 60); do
    echo 'SELECT 1' | docker_process_sql >/dev/null 2>&1 && break
    kill -0 "$pid" 2>/dev/null || die "the temporary server exited"
    sleep 1
  done
  local sql="SET @@SESSION.SQL_LOG_BIN=0; DELETE FROM mysql.global_priv WHERE User = '';"
  if [ -n "$MYSQL_ROOT_PASSWORD" ]; then
    sql+="ALTER USER 'root'@'localhost' IDENTIFIED VIA mysql_native_password USING PASSWORD($(sql_string "$MYSQL_ROOT_PASSWORD")) OR unix_socket;"
  fi
  if [ "$MYSQL_ROOT_HOST" != localhost ]; then
    sql+="CREATE USER 'root'@$(sql_string "$MYSQL_ROOT_HOST") IDENTIFIED BY $(sql_string "$MYSQL_ROOT_PASSWORD");"
    sql+="GRANT ALL ON *.* TO 'root'@$(sql_string "$MYSQL_ROOT_HOST") WITH GRANT OPTION;"
  fi
  if [ -n "$MYSQL_DATABASE" ]; then
    log Note "Creating database $MYSQL_DATABASE"
    sql+="CREATE DATABASE IF NOT EXISTS $(sql_name "$MYSQL_DATABASE");"
  fi
  if [ -n "$MYSQL_USER" ] && [ -n "$MYSQL_PASSWORD" ]; then
    [ "$MYSQL_USER" = root ] && die 'MYSQL_USER="root", MYSQL_USER and MYSQL_PASSWORD are for configuring a regular user and cannot be used for the root user'
    log Note "Creating user $MYSQL_USER"
    sql+="CREATE USER $(sql_string "$MYSQL_USER")@'%' IDENTIFIED BY $(sql_string "$MYSQL_PASSWORD");"
    if [ -n "$MYSQL_DATABASE" ]; then
      log Note "Giving user $MYSQL_USER access to schema $MYSQL_DATABASE"
      sql+="GRANT ALL ON $(sql_name "${MYSQL_DATABASE//_/\\_}").* TO $(sql_string "$MYSQL_USER")@'%';"
    fi
  elif [ -n "$MYSQL_USER" ] || [ -n "$MYSQL_PASSWORD" ]; then
    log Warn "MYSQL_USER and MYSQL_PASSWORD must both be set to create a user"
  fi
  sql+="FLUSH PRIVILEGES;"
  printf '%s\n' "$sql" | docker_process_sql # printf is a builtin: the SQL never reaches argv
  run_initdb
  log Note "Stopping temporary server"
  mariadb-admin --protocol=socket --socket="$SOCKET" -uroot shutdown
  wait "$pid" || true
  log Note "MySQL (MariaDB stand-in) init process done. Ready for start up."
}

if [ "${1:0:1}" = - ]; then
  set -- mysqld "$@"
fi
if [ "$1" = mysqld ] || [ "$1" = mariadbd ]; then
  shift
  args=()
  for a in "$@"; do
    name=${a#--}
    name=${name%%=*}
    name=${name//_/-}
    if [[ $a == --* && $MYSQL_ONLY_FLAGS == *" $name "* ]]; then
      log Warn "dropping MySQL-only flag --$name (MariaDB refuses it)"
      continue
    fi
    args+=("$a")
  done
  for a in "${args[@]}"; do
    case $a in -'?' | --help | --verbose | -V | --version) exec mariadbd "${args[@]}" ;; esac
  done
  mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld "$DATADIR"
  [ -d "$DATADIR/mysql" ] || init_datadir "${args[@]}"
  log Note "Starting MariaDB $(mariadbd --version | awk '{print $3}') as the mysql stand-in"
  exec setpriv --reuid=mysql --regid=mysql --init-groups mariadbd "${args[@]}"
fi
exec "$@"
