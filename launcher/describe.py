"""A LaunchPlan as people read it (`dsl launch --dry-run`, `dsl plan`): one shell line per host.

The lines are copy-pasteable (quoted by launcher/shell.py) with secrets shown as `<secret>`. How a
host's command is started is the backend's to say (`Backend.host_command`, launcher/backends/);
the header, the files and the command run here are the same for every backend.
"""

from __future__ import annotations

from typing import Callable, Mapping

from dsl.launcher import shell
from dsl.launcher.plan import HostLaunch, LaunchPlan


def env_words(plan: LaunchPlan, env: Mapping[str, str]) -> str:
    """`NAME=value ...`, quoted, secrets redacted."""
    return " ".join(f"{k}={shell.quote(v)}" for k, v in plan.redacted_env(env).items())


def describe(plan: LaunchPlan, host_command: Callable[[LaunchPlan, HostLaunch], list[str]]) -> str:
    lines = [
        f"job {plan.name}: {plan.world_size} rank(s) on {len(plan.hosts)} host(s), "
        f"backend {plan.backend}, master {plan.master_addr}:{plan.master_port}",
        f"output: {plan.output_dir}",
    ]
    for path in sorted(plan.files):
        lines.append(f"writes: {path}")
    if plan.submit is not None:
        lines.append(f"\nruns here: cd {shell.quote(plan.submit.cwd)} && env {env_words(plan, plan.submit.env)} "
                     f"{shell.join(plan.submit.argv)}")
        lines.append("which starts on each host:")
    for h in plan.hosts:
        ranks = f"{h.ranks[0]}-{h.ranks[-1]}" if len(h.ranks) > 1 else str(h.ranks[0])
        devices = f", devices {','.join(h.devices)}" if h.devices != tuple(map(str, h.slots)) and h.devices \
            else ""
        lines.append(f"\n[{h.host}] node_rank {h.node_rank}, ranks {ranks}, slots {list(h.slots)}{devices}")
        if plan.submit is not None:
            lines.append(shell.join(h.argv))
        else:
            lines.extend(host_command(plan, h))
    return "\n".join(lines)
