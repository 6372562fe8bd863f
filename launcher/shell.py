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


SETUP_NAME = "dsl-setup"
"""$0 of the bash that runs run.setup before the program (shows in `ps` and in bash's errors)."""


def setup_script(lines: Iterable[str]) -> str:
    """The spec's run.setup lines as shell text run in the current shell (so what a line exports
    or sources reaches what runs next), each with its stdin from /dev/null (a line must not eat
    the guard's stdin), stopping at the first line that fails with its exit code and a message
    naming the line."""
    blocks = []
    for index, line in enumerate(lines):
        blocks.append(
            f"{{ {line}\n}} </dev/null || {{ code=$?; printf 'dsl: %s: run.setup[%s] failed with exit "
            f"%s: %s\\n' \"${{HOSTNAME:-?}}\" {index} \"$code\" {quote(line)} >&2; exit \"$code\"; }}")
    return "\n".join(blocks)


def with_setup(lines: Iterable[str], argv: Iterable[str]) -> list[str]:
    """`bash -c 'SETUP; exec "$@"' dsl-setup ARGV...`: ARGV runs after the setup lines, in the
    same process (exec), with what they exported; just ARGV when there are no lines."""
    lines, argv = list(lines), list(argv)
    if not lines:
        return argv
    return ["bash", "-c", setup_script(lines) + '\nexec "$@"', SETUP_NAME, *argv]


def unwrapped(argv: Iterable[str]) -> list[str]:
    """ARGV of a `with_setup` command (the command itself when it has no setup)."""
    argv = list(argv)
    if argv[:2] == ["bash", "-c"] and argv[3:4] == [SETUP_NAME]:
        return argv[4:]
    return argv


def prepend_export(name: str, value: str) -> str:
    """`export NAME=VALUE"${NAME:+:$NAME}"`: VALUE (literal) in front of NAME's value on the
    host, with no `:` left at the end when NAME was unset or empty (an empty entry in a search
    path such as LD_LIBRARY_PATH or PATH means the current directory)."""
    return f'export {name}={quote(value)}"${{{name}:+:${name}}}"'


def exports(env: Mapping[str, str]) -> str:
    """`export NAME=VALUE` lines (for batch scripts); names were validated by the spec."""
    return "\n".join(f"export {name}={quote(value)}" for name, value in env.items())
