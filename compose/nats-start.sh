#!/bin/sh
# Starts nats-server with compose/nats.conf, giving it the role passwords as quoted strings.
#
# nats.conf reads each password from the environment ($FUSEBUS_<ROLE>_PASSWORD), and
# nats-server parses the variable's value as a config value: left bare, 123456 would be a
# number, 3e8f1a2b9c0d a float and "a;b" two tokens. Quoted, with \ and " escaped, every
# password is read as the exact string it is.
set -eu
for role in SENSOR COORDINATOR AGENT FUSION READER; do
  name="FUSEBUS_${role}_PASSWORD"
  eval "value=\${$name:?$name is not set}"
  escaped=$(printf '%s' "$value" | sed 's/[\\"]/\\&/g')
  export "$name=\"$escaped\""
done
export FUSEBUS_NATS_MONITOR_PORT="${FUSEBUS_NATS_MONITOR_PORT:-8222}"
exec "${NATS_SERVER:-nats-server}" "$@"
