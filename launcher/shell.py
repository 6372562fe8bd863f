"""The one place where argv becomes shell text (for ssh, srun in sbatch scripts, dry runs).

Everything that crosses a shell goes through `join` (POSIX quoting that bash, dash and zsh all
read back into exactly the same words, newlines and unicode included) and `remote_command`.
Nothing else in dsl builds a command string by hand. Tests push hostile values (spaces, quotes,
`;`, `$(...)`, newlines, unicode) through a real bash, ssh, srun and mpirun.
"""

from __future__ import annotations

import shlex
from typing import Iterable, Mapping


class Var(str):
    """A word whose tail is a shell variable expanded where the command runs, e.g.
    `Var("--node-rank=", "SLURM_NODEID")` -> `--node-rank="$SLURM_NODEID"`. As a plain string it
    reads `--node-rank=$SLURM_NODEID` (for plans shown to people)."""

    def __new__(cls, prefix: str, name: str) -> "Var":
        word = super().__new__(cls, f"{prefix}${name}")
        word.prefix, word.name = prefix, name
        return word

    prefix: str
    name: str

    def __reduce__(self):  # copy/deepcopy/pickle keep it a Var
        return (Var, (self.prefix, self.name))


def quote(word: str) -> str:
    if isinstance(word, Var):
        return (shlex.quote(word.prefix) if word.prefix else "") + f'"${word.name}"'
    return shlex.quote(word)


def join(argv: Iterable[str]) -> str:
    """Shell text that a POSIX shell splits back into exactly `argv` (Var words expand there)."""
    return " ".join(quote(word) for word in argv)


def remote_command(cwd: str, argv: Iterable[str]) -> str:
    """`cd CWD && exec ARGV`: what an ssh session (or srun's bash) runs for one host.

    `exec` replaces the login shell, so the guard is the session's process: no shell stays in
    between to swallow signals or the end of stdin.
    """
    return f"cd {quote(cwd)} && exec {join(argv)}"


def exports(env: Mapping[str, str]) -> str:
    """`export NAME=VALUE` lines (for batch scripts); names were validated by the spec."""
    return "\n".join(f"export {name}={quote(value)}" for name, value in env.items())
