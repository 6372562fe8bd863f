"""python -m tests.cluster up [--hosts N] | down | status | exec HOST -- CMD..."""

from __future__ import annotations

import argparse
import json
import os
import sys

from tests.cluster.core import ClusterError, current, down, status, up


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.cluster", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_up = sub.add_parser("up", help="bring the cluster up (or repair it); idempotent")
    p_up.add_argument("--hosts", type=int, default=3, help="number of hosts node1..nodeN (default 3)")
    sub.add_parser("down", help="stop everything and remove namespaces, bridge and state; idempotent")
    sub.add_parser("status", help="print what is up as JSON")
    p_exec = sub.add_parser("exec", help="run a command inside a host (or `head`: root netns with the cluster's "
                                         "/etc/hosts, ssh config and slurm.conf)")
    p_exec.add_argument("host")
    p_exec.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "up":
            cluster = up(args.hosts, owner="user")
            print(json.dumps({"hosts": cluster.ips, "head": cluster.head_ip, "ssh_config": str(cluster.ssh_config),
                              "env": cluster.env()}, indent=1))
        elif args.cmd == "down":
            down()
        elif args.cmd == "status":
            info = status()
            print(json.dumps(info, indent=1))
            return 0 if info.get("up") else 1
        elif args.cmd == "exec":
            command = args.command[1:] if args.command[:1] == ["--"] else args.command
            if not command:
                parser.error("exec needs a command: exec HOST -- CMD...")
            cluster = current()
            if cluster is None:
                print("the test cluster is not up (python -m tests.cluster up)", file=sys.stderr)
                return 1
            argv = cluster.on_head(command) if args.host == cluster.head else cluster.on_host(args.host, command)
            env = {**os.environ, **cluster.env()}
            os.execvpe(argv[0], argv, env)
    except ClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
