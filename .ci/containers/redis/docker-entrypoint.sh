#!/bin/sh
# The official redis image's argument handling, on Debian's redis-server.
set -e
# Flags only (`--appendonly yes`) or a config file first: they are redis-server's arguments.
if [ "${1#-}" != "$1" ] || [ "${1%.conf}" != "$1" ]; then
  set -- redis-server "$@"
fi
if [ "$1" = redis-server ]; then
  # The official image compiles protected mode off (it is reached over the container network);
  # given first, a --protected-mode in the user's arguments still wins. A config file (or "-",
  # configuration on stdin) stays the first argument, where redis-server looks for it.
  shift
  if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then
    conf=$1
    shift
    set -- redis-server "$conf" --protected-mode no "$@"
  else
    set -- redis-server --protected-mode no "$@"
  fi
  if [ "$(id -u)" = 0 ]; then
    find . \! -user redis -exec chown redis '{}' +
    # The official image's umask for the data it writes.
    [ "$(umask)" != 0022 ] || umask 0077
    exec setpriv --reuid=redis --regid=redis --init-groups "$@"
  fi
fi
[ "$(umask)" != 0022 ] || umask 0077
exec "$@"
