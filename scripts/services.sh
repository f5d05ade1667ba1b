#!/usr/bin/env bash
# Makes sure the local services the tests use are up (PostgreSQL, Redis, RabbitMQ), starting any that stopped.
set -uo pipefail
up() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_up() { for _ in $(seq 1 30); do up "$1" && return 0; sleep 1; done; return 1; }

if ! up 5432; then
  echo "starting PostgreSQL" >&2
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
  wait_up 5432 || echo "PostgreSQL did not come up on 127.0.0.1:5432" >&2
fi
if ! up 6379; then
  echo "starting Redis" >&2
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log || redis-server --daemonize yes --port 6379 --save ""
  wait_up 6379 || echo "Redis did not come up on 127.0.0.1:6379" >&2
fi
if ! up 5672; then
  echo "starting RabbitMQ" >&2
  rabbitmq-server -detached || true
  for _ in $(seq 1 60); do up 5672 && break; sleep 1; done
  up 5672 || echo "RabbitMQ did not come up on 127.0.0.1:5672" >&2
fi
exit 0
