#!/usr/bin/env bash
# Usage (root): PGPORT=5432 PGPASS_APP=... bench/scripts/connect_redirect.sh
# pgbench -C opens a new connection per transaction; its per-transaction log gives the
# connect + authenticate + first query time, direct (SCRAM to PostgreSQL) and redirected (an
# agent cgroup steered by the eBPF programs to the gateway, which authenticates upstream).
# Then a connect storm (STORM clients, default 64, reconnecting for 10 s) into the same gateway
# through its explicit listener and redirected: the gap is what the redirect costs per accepted
# connection (its eBPF record, the map lookup and the /proc reads, on the lookup threads).
set -euo pipefail
GW=$(realpath "${GW:-target/release/portcullis}")
PGPORT=${PGPORT:?the port of a running PostgreSQL 15 with role app (password in PGPASS_APP) and database app}; RPORT=15499; LPORT=6598
CG=$(awk '$3=="cgroup2"{print $2; exit}' /proc/self/mounts)
ROOT=$CG/portcullis-connbench; PIN=/sys/fs/bpf/portcullis-connbench
W=$(mktemp -d); cd $W
umask 077; echo "${PGPASS_APP:?}" > pw
cat > gw.toml <<TOML
[gateway]
admin_socket = "$W/admin.sock"
state_dir = "$W/state"
policy = "observe"
[[listener]]
listen = "127.0.0.1:$LPORT"
target = "main"
[[target]]
name = "main"
upstream = "postgres://app@127.0.0.1:$PGPORT/app?sslmode=disable"
password_file = "$W/pw"
[redirect]
enabled = true
listen = "127.0.0.1:$RPORT"
listen_v6 = "[::1]:$RPORT"
pin_path = "$PIN"
agent_cgroup_root = "$ROOT"
TOML
$GW serve --config gw.toml > gw.log 2>&1 &
GWPID=$!
sleep 2
echo "SELECT 1;" > q.sql
run() { # $1 label, rest: command prefix
  local label=$1; shift
  rm -f pgbench_log.*
  "$@" /usr/lib/postgresql/15/bin/pgbench -n -C -c 1 -t 1000 -f q.sql -l "host=127.0.0.1 port=$PGPORT user=app dbname=app sslmode=disable" > out.$label 2>&1 || { cat out.$label; }
  awk '{print $3}' pgbench_log.* | sort -n | awk -v l=$label '{a[NR]=$1} END {printf "%s: n=%d median=%d us p99=%d us\n", l, NR, a[int(NR*0.5)], a[int(NR*0.99)]}'
}
for i in 1 2; do
  PGPASSWORD="$PGPASS_APP" run direct env
  PGPASSWORD=wrong run redirected $GW run --agent connbench --pin-path $PIN --agent-root $ROOT --
done
storm() { # $1 label, $2 port, rest: command prefix
  local label=$1 port=$2; shift 2
  rm -f pgbench_log.*
  "$@" /usr/lib/postgresql/15/bin/pgbench -n -C -c "${STORM:-64}" -j 2 -T 10 -f q.sql -l "host=127.0.0.1 port=$port user=app dbname=app sslmode=disable" > out.$label 2>&1 || { cat out.$label; }
  cat pgbench_log.* | awk '{print $3}' | sort -n | awk -v l=$label '{a[NR]=$1} END {printf "%s: %d connections in 10 s, median=%d us p99=%d us\n", l, NR, a[int(NR*0.5)], a[int(NR*0.99)]}'
  echo "$label: refused so far: $(grep -c "refusing a redirected connection" gw.log || true)"
}
for i in 1 2; do
  PGPASSWORD=wrong storm storm-explicit $LPORT env
  PGPASSWORD=wrong storm storm-redirected $PGPORT $GW run --agent connbench --pin-path $PIN --agent-root $ROOT --
done
kill $GWPID; wait $GWPID || true
$GW uninstall --pin-path $PIN --agent-root $ROOT >/dev/null 2>&1 || true
