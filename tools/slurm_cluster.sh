#!/usr/bin/env bash
# A real SLURM 22.05 cluster on this one machine, for tests and trying launch/slurm.py:
# munged, MariaDB + slurmdbd (accounting: sacct, and submitit's detection of crashed jobs),
# slurmctld, and one slurmd per emulated node (n1..nN on 127.0.0.1). Everything lives under
# $LSA_SLURM_DIR (default: <repo>/.slurm); no systemd; only the processes it started are stopped.
#
#   tools/slurm_cluster.sh start      install what is missing (root), configure, start, wait for the nodes
#   tools/slurm_cluster.sh stop       stop our daemons
#   tools/slurm_cluster.sh status     what runs, and sinfo
#   eval "$(tools/slurm_cluster.sh env)"   point sbatch/squeue/sacct/submitit at this cluster
#
# Partitions: batch (default, preemptible: requeued after its USR2 signal and a 60 s grace time)
# and urgent (higher priority tier: preempts batch). Settings for fast tests: cred_expire=10,
# sched_interval=1, preempt_send_user_signal.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${LSA_SLURM_DIR:-$REPO/.slurm}"
NODES="${LSA_SLURM_NODES:-4}"
CPUS="${LSA_SLURM_CPUS:-4}"        # per emulated node (oversubscribes the real cores on purpose)
MEM_MB="${LSA_SLURM_MEM_MB:-8000}"  # per emulated node
CLUSTER=lsa
CTLD_PORT=16817
DBD_PORT=16819
DB_PORT=13306
NODE_PORT0=17000
MUNGE_SOCKET="$DIR/munge/run/munge.socket.2"
PACKAGES=(slurm-wlm slurmdbd munge mariadb-server)

log() { echo "slurm_cluster: $*" >&2; }
die() { echo "slurm_cluster: error: $*" >&2; exit 1; }

install_packages() {
  local missing=()
  for p in "${PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" -eq 0 ] || die "missing packages ${missing[*]}; run as root or: sudo apt-get install -y ${missing[*]}"
  log "installing ${missing[*]}"
  # keep the packages' own services from starting: we run our own daemons
  local created=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; created=1; fi
  export DEBIAN_FRONTEND=noninteractive
  local rc=0
  apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q "${missing[@]}" >/dev/null; } || rc=$?
  if [ "$created" -eq 1 ]; then rm -f /usr/sbin/policy-rc.d; fi  # also when apt-get failed
  [ "$rc" -eq 0 ] || die "apt-get could not install ${missing[*]} (exit $rc)"
  return 0
}

node_names() { seq -f "n%g" 1 "$NODES"; }

ensure_hosts() {
  local names; names="$(node_names | tr '\n' ' ')"
  if ! grep -q "# lsa_dist slurm_cluster" /etc/hosts 2>/dev/null; then
    [ -w /etc/hosts ] || die "node names must resolve: add '127.0.0.1 $names' to /etc/hosts"
    echo "127.0.0.1 $names # lsa_dist slurm_cluster" >> /etc/hosts
  elif ! grep "# lsa_dist slurm_cluster" /etc/hosts | grep -q " n$NODES "; then
    sed -i "s/^.*# lsa_dist slurm_cluster$/127.0.0.1 $names # lsa_dist slurm_cluster/" /etc/hosts
  fi
}

pid_alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# ours PIDFILE: the pid in it is alive and one of this cluster's daemons: its command line names
# $DIR (munged, mariadbd) or it was started with this cluster's SLURM_CONF (slurm daemons). A
# stale pid file whose number now belongs to another process is not ours: never signalled.
ours() {
  pid_alive "$1" || return 1
  local pid; pid="$(cat "$1")"
  grep -qaF -- "$DIR/" "/proc/$pid/cmdline" 2>/dev/null && return 0
  # (grep reads all of it: an early exit could fail the pipe with SIGPIPE under pipefail)
  tr '\0' '\n' < "/proc/$pid/environ" 2>/dev/null | grep -xF "SLURM_CONF=$DIR/etc/slurm.conf" >/dev/null
}

# the accounting database's password: generated once, kept owner-only beside the configs
db_password() {
  local file="$DIR/etc/db.password"
  if [ ! -s "$file" ]; then
    (umask 077 && head -c 24 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' > "$file")
  fi
  cat "$file"
}

write_configs() {
  mkdir -p "$DIR"/{etc,run,log,state} "$DIR"/munge/{etc,run,lib,log} "$DIR"/mysql/{data,run}
  chmod 755 "$DIR/munge/run"  # munged's socket folder must be world-readable
  if [ ! -s "$DIR/munge/etc/munge.key" ]; then  # created owner-read-only: never readable by others
    (umask 277 && dd if=/dev/urandom of="$DIR/munge/etc/munge.key" bs=1024 count=1 status=none)
  fi
  local nodes_line="" i=1
  for n in $(node_names); do
    nodes_line+="NodeName=$n NodeAddr=127.0.0.1 NodeHostname=$(hostname) Port=$((NODE_PORT0 + i)) CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN"$'\n'
    mkdir -p "$DIR/spool/$n"
    i=$((i + 1))
  done
  cat > "$DIR/etc/slurm.conf" <<EOF
ClusterName=$CLUSTER
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
KillWait=10
InactiveLimit=0
MinJobAge=300
JobRequeue=1
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
AccountingStoragePass=$MUNGE_SOCKET
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
$nodes_line
PartitionName=batch Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=60
PartitionName=urgent Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
EOF
  local password; password="$(db_password)"
  rm -f "$DIR/etc/slurmdbd.conf"
  (umask 077 && cat > "$DIR/etc/slurmdbd.conf") <<EOF
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$password
StorageLoc=slurm_acct_db
EOF
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local seconds=$1 what=$2; shift 2
  local end=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $end ] || die "$what did not come up within ${seconds}s (logs in $DIR/log)"
    sleep 0.3
  done
}

start_munge() {
  ours "$DIR/run/munged.pid" && return 0
  munged --force --socket="$MUNGE_SOCKET" --key-file="$DIR/munge/etc/munge.key" \
    --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/lib/munged.seed"
  wait_for 10 munged munge -n -S "$MUNGE_SOCKET"
}

start_mariadb() {
  ours "$DIR/run/mariadbd.pid" && return 0
  if [ ! -d "$DIR/mysql/data/mysql" ]; then
    # root logs in through the unix socket as the system's root only: no password-less root on TCP
    mariadb-install-db --user=root --datadir="$DIR/mysql/data" --auth-root-authentication-method=socket \
      >"$DIR/log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed (see $DIR/log/mariadb-install.log)"
  fi
  mariadbd --user=root --datadir="$DIR/mysql/data" --socket="$DIR/mysql/run/mysqld.sock" --port=$DB_PORT \
    --bind-address=127.0.0.1 --pid-file="$DIR/run/mariadbd.pid" --log-error="$DIR/log/mariadb.log" \
    --skip-name-resolve --innodb-buffer-pool-size=64M >/dev/null 2>&1 &
  wait_for 30 MariaDB mariadb --socket="$DIR/mysql/run/mysqld.sock" -uroot -e "select 1"
  local password; password="$(db_password)"
  # (a data folder from before: its root is moved to socket-only login too)
  mariadb --socket="$DIR/mysql/run/mysqld.sock" -uroot <<EOF
ALTER USER 'root'@'localhost' IDENTIFIED VIA unix_socket;
DROP USER IF EXISTS 'root'@'127.0.0.1', 'root'@'::1', 'root'@'$(hostname)', ''@'localhost', ''@'$(hostname)';
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$password';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$password';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$password';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$password';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
EOF
}

start_slurm() {
  export SLURM_CONF="$DIR/etc/slurm.conf"
  if ! ours "$DIR/run/slurmdbd.pid"; then
    slurmdbd
    wait_for 30 slurmdbd sacctmgr -n list cluster
  fi
  sacctmgr -i -Q add cluster "$CLUSTER" >/dev/null 2>&1 || true
  if ! ours "$DIR/run/slurmctld.pid"; then
    slurmctld -c  # a cold start: job ids restart at 1 (give every submission its own folder)
    wait_for 30 slurmctld scontrol ping
  fi
  for n in $(node_names); do
    ours "$DIR/run/slurmd-$n.pid" || slurmd -N "$n"
  done
  wait_for 60 "$NODES responding nodes" bash -c "[ \"\$(sinfo -h -p batch -t idle,alloc,mix,comp -o %D | awk '{s+=\$1} END {print s+0}')\" = \"$NODES\" ]"
}

start() {
  install_packages
  ensure_hosts
  write_configs
  start_munge
  start_mariadb
  start_slurm
  log "cluster '$CLUSTER' up: $NODES nodes x $CPUS CPUs; eval \"\$($0 env)\" to use it"
}

stop() {
  export SLURM_CONF="$DIR/etc/slurm.conf"
  local f
  # cancel this cluster's jobs first, so that their job steps end with them
  if ours "$DIR/run/slurmctld.pid"; then
    squeue -h -o %i 2>/dev/null | xargs -r scancel 2>/dev/null || true
    for _ in $(seq 30); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.5; done
  fi
  for f in "$DIR"/run/slurmd-*.pid "$DIR/run/slurmctld.pid" "$DIR/run/slurmdbd.pid" "$DIR/run/mariadbd.pid" "$DIR/run/munged.pid"; do
    [ -f "$f" ] || continue
    if ours "$f"; then
      local pid; pid="$(cat "$f")"
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
      if kill -0 "$pid" 2>/dev/null && ours "$f"; then kill -9 "$pid" 2>/dev/null || true; fi  # still that daemon
    fi
    rm -f "$f"
  done
  log "stopped"
}

status() {
  local f name
  for f in "$DIR"/run/*.pid; do
    [ -f "$f" ] || continue
    name="$(basename "$f" .pid)"
    if ours "$f"; then echo "$name running (pid $(cat "$f"))"; else echo "$name not running"; fi
  done
  SLURM_CONF="$DIR/etc/slurm.conf" sinfo 2>/dev/null || echo "slurmctld not reachable"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  env) echo "export SLURM_CONF=$DIR/etc/slurm.conf" ;;
  *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
