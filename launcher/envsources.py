"""Where the ranks' environment comes from, and which values are secret.

From lowest to highest precedence (a later source overrides an earlier one):

1. `env.forward_prefixes`: every variable of the environment of `dsl launch` whose name starts
   with one of them (default DeepSpeed's: NCCL, PYTHON, UCX, MLFLOW, MV2); not for backend
   slurm, where sbatch passes the submitting shell's environment on by itself;
2. `~/.deepspeed_env`, `~/.dsl_env`, then `./.deepspeed_env`, `./.dsl_env` (`.` = the working
   folder of `dsl launch`; DS_ENV_FILE renames `.deepspeed_env`, as for DeepSpeed), read as
   DeepSpeed reads `.deepspeed_env` (launcher/envfile.py, `parse_deepspeed_env`); off with
   `env.dotfiles: false`. DeepSpeed's own order is the same: shell exports first, then its
   files, home before the working folder;
3. `env.file` (dotenv syntax, launcher/envfile.py `parse_env_file`);
4. `env.forward`: the named variables of the environment of `dsl launch`;
5. `env.vars`.

Secret: the names in `env.secret`, and any variable from sources 1-4 whose name looks like a
credential (TOKEN, SECRET, PASSWORD, API_KEY, ...): a token in a `.deepspeed_env` must not
appear in a dry run or plan.json because nobody listed it. Their values reach the ranks (on
stdin over ssh) but are shown as `<secret>` everywhere dsl prints or writes a plan.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from dsl.launcher.envfile import load_env_file, parse_deepspeed_env
from dsl.engine.errors import UserError

log = logging.getLogger(__name__)

DOTFILE_NAMES = (".deepspeed_env", ".dsl_env")
_SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSW|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY|CREDENTIAL",
                          re.IGNORECASE)


def looks_secret(name: str) -> bool:
    return bool(_SECRET_NAME.search(name))


@dataclass
class EnvValues:
    values: dict[str, str] = field(default_factory=dict)
    secrets: set[str] = field(default_factory=set)
    """Names found secret-looking in sources the spec does not spell out (1-4)."""
    sources: list[str] = field(default_factory=list)
    """The dotfiles read, for the log."""


def dotfiles(home: Path, cwd: Path, environ: Mapping[str, str]) -> list[Path]:
    names = (environ.get("DS_ENV_FILE", DOTFILE_NAMES[0]), *DOTFILE_NAMES[1:])
    seen, out = set(), []
    for folder in (home, cwd):
        for name in names:
            path = (folder / name).resolve()
            if path not in seen and path.is_file():
                seen.add(path)
                out.append(path)
    return out


def read_dotfile(path: Path) -> dict[str, str]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UserError(f"{path}: cannot read this environment file: {exc.strerror or exc}") from None
    return parse_deepspeed_env(text, str(path))


def env_values(spec_file, environ: Mapping[str, str] | None = None,  # spec_file: SpecFile
               home: Path | None = None, cwd: Path | None = None) -> EnvValues:
    """Every source above, merged. Raises UserError for an unreadable or malformed file and for
    a secret without a value."""
    environ = os.environ if environ is None else environ
    env = spec_file.spec.env
    out = EnvValues()

    def add(values: Mapping[str, str]) -> None:
        out.values.update(values)
        out.secrets.update(name for name in values if looks_secret(name))

    # Slurm's sbatch passes the submitting shell's whole environment on by itself; writing the
    # prefixed variables into the batch script would only make it depend on that shell.
    from dsl.launcher.backends import backend_of

    prefixes = tuple(env.forward_prefixes) if backend_of(spec_file).forwards_env_prefixes else ()
    add({k: v for k, v in environ.items() if prefixes and k.startswith(prefixes)})
    if env.dotfiles:
        for path in dotfiles(home or Path.home(), cwd or Path.cwd(), environ):
            add(read_dotfile(path))
            out.sources.append(str(path))
            log.info("env: %s read (env.dotfiles)", path)
    if env.file:
        add(load_env_file(spec_file.resolve(env.file), spec_file.where("env", "file")))
    add({name: environ[name] for name in env.forward if name in environ})
    out.values.update(env.vars)
    missing = [n for n in env.secret if n not in out.values and n not in environ]
    if missing:
        raise UserError(f"{spec_file.where('env', 'secret')}: secret {', '.join(missing)} has no "
                        "value (set it in env.vars, env.file or the environment of dsl launch)")
    return out
