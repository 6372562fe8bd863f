"""The local test cluster (tests/cluster) behaves like real hosts: ssh, TCP, Slurm, OpenMPI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.cluster import up
from tests.cluster.core import node_states

pytestmark = pytest.mark.integration
PY = sys.executable  # /tmp and the work tree are shared by every host


def run(cluster, argv, timeout=60, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **cluster.env()}, **kw)
    assert proc.returncode == 0, f"{argv} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        time.sleep(0.1)


def cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except psutil.Error:  # exited (or a zombie) meanwhile
        return []


def test_ssh_by_name_from_head_reaches_every_host(cluster):
    procs = {h: subprocess.Popen(cluster.on_head(["ssh", h, "hostname"]), stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for h in cluster.hosts}
    for host, proc in procs.items():
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert out.strip() == host
    # With the generated client config, from the root namespace, by IP.
    assert run(cluster, cluster.ssh_argv(cluster.hosts[-1], "hostname")).stdout.strip() == cluster.hosts[-1]


def test_hosts_have_own_network_hostname_and_shm_but_share_tmp(cluster, tmp_path):
    marker = f"dsl-{os.getpid()}-{time.monotonic_ns()}"
    script = (f"hostname; ls /sys/class/net; touch /dev/shm/{marker}; "
              f"echo $(hostname) > {tmp_path}/from-$(hostname); getent hosts head node2")
    out = run(cluster, cluster.on_host("node1", ["sh", "-c", script])).stdout.split()
    assert out[:3] == ["node1", "eth0", "lo"]
    assert out[3:] == [cluster.head_ip, "head", cluster.ips["node2"], "node2"]
    assert (tmp_path / "from-node1").read_text() == "node1\n"
    assert not os.path.exists(f"/dev/shm/{marker}")
    assert run(cluster, cluster.on_host("node2", ["sh", "-c", f"test ! -e /dev/shm/{marker}"]))
    run(cluster, cluster.on_host("node1", ["rm", f"/dev/shm/{marker}"]))


def test_tcp_between_two_host_namespaces(cluster):
    server_code = ("import socket; s = socket.create_server(('node2', 0)); print(s.getsockname()[1], flush=True); "
                   "c, addr = s.accept(); c.sendall(socket.gethostname().encode()); print(addr[0], flush=True)")
    server = subprocess.Popen(cluster.on_host("node2", [PY, "-c", server_code]), stdout=subprocess.PIPE,
                              text=True)
    try:
        port = int(server.stdout.readline())
        client_code = (f"import socket; c = socket.create_connection(('node2', {port}), timeout=5); "
                       "print(c.recv(100).decode())")
        got = run(cluster, cluster.on_host("node1", [PY, "-c", client_code]), timeout=20).stdout.strip()
        assert got == "node2"
        assert server.stdout.readline().strip() == cluster.ips["node1"]  # the client came from node1's address
        assert server.wait(timeout=10) == 0
    finally:
        server.kill()
        server.wait()


def test_sinfo_lists_every_node_idle(cluster):
    out = run(cluster, ["sinfo", "-h", "-N", "-o", "%N %T"]).stdout.split()
    assert dict(zip(out[::2], out[1::2])) == {h: "idle" for h in cluster.hosts}
    assert node_states(cluster) == {h: "idle" for h in cluster.hosts}


def test_srun_runs_on_two_nodes(cluster):
    out = run(cluster, ["srun", "-N2", "-n2", "hostname"], timeout=30).stdout.split()
    assert sorted(out) == ["node1", "node2"]


def test_sbatch_job_completes_and_writes_its_output(cluster, tmp_path):
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/sh\n#SBATCH -N2 -n2\nsrun --export=ALL hostname\necho done on $(hostname)\n")
    out = tmp_path / "job-%j.out"
    job = run(cluster, ["sbatch", "--parsable", "-o", str(out), str(script)], cwd=tmp_path).stdout.strip()
    job_id = job.split(";")[0]

    def finished():
        return run(cluster, ["squeue", "-h", "-j", job_id, "-o", "%T"]).stdout.strip() == ""

    wait_for(finished, 30, f"job {job_id} to leave the queue")
    info = run(cluster, ["scontrol", "show", "job", job_id]).stdout
    assert "JobState=COMPLETED" in info and "ExitCode=0:0" in info, info
    lines = (tmp_path / f"job-{job_id}.out").read_text().splitlines()
    assert sorted(lines[:2]) == ["node1", "node2"] and lines[2] == "done on node1"


def test_mpirun_across_two_hosts(cluster, tmp_path):
    hostfile = cluster.write_hostfile(tmp_path / "hosts", slots=1, hosts=["node1", "node2"])
    mpirun = ["mpirun", "--allow-run-as-root", "--hostfile", str(hostfile), "-np", "2",
              "--mca", "plm_rsh_args", f"-F {cluster.ssh_config}"]
    out = run(cluster, cluster.on_head([*mpirun, "hostname"])).stdout.split()
    assert sorted(out) == ["node1", "node2"]
    code = ("import os, socket; print(os.environ['OMPI_COMM_WORLD_RANK'], os.environ['OMPI_COMM_WORLD_SIZE'], "
            "socket.gethostname())")
    lines = run(cluster, cluster.on_head([*mpirun, PY, "-c", code])).stdout.splitlines()
    assert sorted(lines) == ["0 2 node1", "1 2 node2"]


def test_up_again_is_idempotent_and_fast(cluster):
    start = time.monotonic()
    again = up(len(cluster.hosts))
    assert time.monotonic() - start < 2.0
    assert again == cluster


def test_process_listing_finds_processes_per_host(cluster):
    def remote_sleep():
        return [p for p in cluster.processes_on("node3") if cmdline(p) == ["sleep", "61"]]

    direct = subprocess.Popen(cluster.on_host("node2", ["sleep", "60"]))
    remote = subprocess.Popen(cluster.on_head(["ssh", "node3", "exec sleep 61"]))
    try:
        wait_for(lambda: direct.pid in cluster.pids_on("node2"), 5, "sleep on node2")
        assert direct.pid not in cluster.pids_on("node1")

        wait_for(remote_sleep, 10, "sleep started over ssh on node3")
        # Closing the ssh client (no pty) leaves the remote process running: it must be findable.
        remote.kill()
        remote.wait()
        time.sleep(0.3)
        assert remote_sleep(), "the remote sleep died with its ssh client"
    finally:
        for proc in [direct, remote]:
            proc.kill()
            proc.wait()
        for proc in remote_sleep():
            proc.send_signal(signal.SIGKILL)
    wait_for(lambda: direct.pid not in cluster.pids_on("node2") and not remote_sleep(), 10,
             "the sleeps to be gone")
    daemons = set(cluster.pids_on("node1", include_daemons=True)) - set(cluster.pids_on("node1"))
    assert [psutil.Process(p).name() for p in sorted(daemons)] == ["sshd", "slurmd"]
