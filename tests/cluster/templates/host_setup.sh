#!/bin/sh
# Runs once inside a new host's namespaces (its network namespace plus a fresh, persistent UTS and
# mount namespace) to make it look like a machine of its own. Arguments:
#   NAME HOSTS_FILE SSH_CONFIG SLURM_ETC_DIR SCRATCH_DIR
set -eu
name=$1 hosts=$2 ssh_config=$3 slurm_etc=$4 scratch=$5

hostname "$name"
mount --bind "$hosts" /etc/hosts
if [ -e /etc/ssh/ssh_config ]; then mount --bind "$ssh_config" /etc/ssh/ssh_config; fi
if [ -d /etc/slurm ]; then mount --bind "$slurm_etc" /etc/slurm; fi
# Own shared memory (gloo, PMIx and OpenMPI's vader put files there); /tmp stays shared.
mount -t tmpfs -o mode=1777,nosuid,nodev shm /dev/shm
# A sysfs of this network namespace (/sys/class/net lists eth0 and lo only), keeping the cgroup tree.
{
  mount --rbind /sys/fs/cgroup "$scratch" &&
  mount -t sysfs -o nosuid,nodev,noexec sysfs /sys &&
  mount --move "$scratch" /sys/fs/cgroup
} || echo "host_setup: could not remount /sys in $name (continuing)" >&2
mkdir -p /run/sshd
