#!/bin/sh
# Starts nats-server with compose/nats.conf, giving it the role passwords as quoted strings.
#
# nats.conf reads each password from the environment ($FUSEBUS_<ROLE>_PASSWORD), and
# nats-server parses the variable's value as a config value: left bare, 123456 would be a
# number, 3e8f1a2b9c0d a float and "a;b" two tokens. Quoted, with \ and " escaped, every
# password is read as the exact string it is.
#
# A cluster node (compose/nats-cluster.conf, FUSEBUS_NATS_PEERS set) also gets its routes:
# one nats-route:// URL per peer with the route password percent-encoded byte by byte (so
# @, :, / and % in it mean nothing to the URL), and the route password quoted like the rest.
set -eu
roles="SENSOR COORDINATOR AGENT FUSION READER MODELS"
if [ -n "${FUSEBUS_NATS_PEERS:-}" ]; then
  route_password=${FUSEBUS_ROUTE_PASSWORD:?FUSEBUS_ROUTE_PASSWORD is not set}
  encoded=$(printf '%s' "$route_password" | od -A n -t x1 -v | tr -d ' \n' | sed 's/../%&/g')
  routes=""
  for peer in $(printf '%s' "$FUSEBUS_NATS_PEERS" | tr ',' ' '); do
    routes="$routes${routes:+, }\"nats-route://route:$encoded@$peer\""
  done
  export FUSEBUS_NATS_ROUTES="[$routes]"
  export FUSEBUS_NATS_CLUSTER_HOST="${FUSEBUS_NATS_CLUSTER_HOST:-0.0.0.0}"
  export FUSEBUS_NATS_CLUSTER_PORT="${FUSEBUS_NATS_CLUSTER_PORT:-6222}"
  roles="$roles ROUTE"
fi
for role in $roles; do
  name="FUSEBUS_${role}_PASSWORD"
  eval "value=\${$name:?$name is not set}"
  escaped=$(printf '%s' "$value" | sed 's/[\\"]/\\&/g')
  export "$name=\"$escaped\""
done
export FUSEBUS_NATS_MONITOR_PORT="${FUSEBUS_NATS_MONITOR_PORT:-8222}"
exec "${NATS_SERVER:-nats-server}" "$@"
