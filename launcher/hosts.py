"""DeepSpeed-compatible hostfiles and host selection (--include/--exclude/--num_nodes/--num_procs).

Hostfile grammar, one host per line (leading/trailing whitespace ignored; blank lines and lines
starting with `#` skipped; a UTF-8 BOM and CRLF line endings are accepted):

    HOSTNAME WS+ slots=N [WS* # comment]

HOSTNAME is `[A-Za-z0-9._-]+` not starting with `-`, or an IPv4/IPv6 literal; N >= 1.

Selection grammar (DeepSpeed's), for --include and --exclude:

    SPEC      = NODE_SPEC [@ NODE_SPEC ...]
    NODE_SPEC = NAME [: SLOT [, SLOT ...]]        NAME may be an IPv6 literal in brackets: [::1]:0

--include builds the selection from scratch (a bare NAME = all its slots); --exclude starts from
every slot and removes the listed ones (a bare NAME removes the host). Hosts left without slots
are dropped, and the result keeps hostfile order with sorted, unique slots. Then --num_nodes keeps
the first N hosts and --num_procs the first N selected slots of each host. An empty string for
include/exclude means the flag is absent, as DeepSpeed's default "" does.

Behaviours of DeepSpeed 0.19.8 (deepspeed/launcher/runner.py) deliberately changed; each is a
UserError naming the file:line, flag or piece, where DeepSpeed crashes, misreads or says less:
- --include with --exclude: still an error, now a UserError rather than a bare ValueError.
- A host not in the hostfile: lists the known hosts and suggests a close match (DeepSpeed:
  "Hostname 'x' not found in hostfile").
- A slot outside a host's range: also gives the valid range (DeepSpeed: "No slot '4' ...").
- A non-integer or negative slot, an empty piece (`a@@b`, `a:`, `a:1,,2`) or a piece with more
  than one `:`: names the piece (DeepSpeed: int()'s or unpacking's raw ValueError).
- The same host twice in one string (DeepSpeed silently lets `a@a:1` mean `a:1`), or the same
  slot twice in --exclude (DeepSpeed drops the repeat): an error. Repeated --include slots are
  still merged, as in DeepSpeed.
- An --exclude that leaves no slot: an error (DeepSpeed goes on and fails on an IndexError).
- --num_procs keeps the first N *selected* slots; DeepSpeed's --num_gpus N sets every host's
  slots to range(N), ignoring the selection and even the host's slots= (its main() therefore
  refuses --num_gpus/--num_nodes with --include/--exclude; here they combine). --num_procs or
  --num_nodes larger than what is selected, or below 1, is an error (DeepSpeed: too many slots
  or hosts silently, and a value <= 0 means "all").
- Hostfile: `slots=0`, anything after `slots=N` but a `# comment` (DeepSpeed reads `slots=4gpu`
  as 4 and ignores `slots=4 extra`) and invalid host names (DeepSpeed takes any word, even
  `-oFoo`, which ssh would read as an option) are errors naming file and line; a UTF-8 BOM is
  skipped (DeepSpeed makes it part of the first host's name). A missing hostfile is an error
  here (DeepSpeed warns and falls back to the local GPUs).

Without a hostfile the run is local (`local_host`). When CUDA_VISIBLE_DEVICES is set in the
environment of dsl, its entries are the host's devices, as DeepSpeed reads it as
`--include localhost:<entries>` (`visible_host`): a slot is then an index into that list and
`Host.devices` keeps each entry verbatim, so GPU UUIDs and MIG ids work too (DeepSpeed parses the
entries as integers). A hostfile's slots are physical indices and win over CUDA_VISIBLE_DEVICES,
as in DeepSpeed (launcher/launch.py says so in a log line).
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from dsl.engine.errors import UserError

_NAME = re.compile(r"[A-Za-z0-9._][A-Za-z0-9._-]*")
_SLOT = re.compile(r"[0-9]+")
_SLOTS_FIELD = re.compile(r"slots=([^\s#]*)\s*(.*)")


@dataclass(frozen=True)
class Host:
    name: str
    slots: tuple[int, ...]
    """Accelerator indices as this host's launching environment numbers them (sorted, unique)."""
    devices: tuple[str, ...] = ()
    """What names each slot's device in CUDA_VISIBLE_DEVICES, one entry per slot: the slot number
    itself (the default), or an entry of the caller's CUDA_VISIBLE_DEVICES (an index, GPU UUID or
    MIG id, verbatim) when a local run passes it through (`visible_host`)."""

    def __post_init__(self) -> None:
        if not self.devices:
            object.__setattr__(self, "devices", tuple(str(s) for s in self.slots))
        elif len(self.devices) != len(self.slots):
            raise ValueError(f"host {self.name}: {len(self.slots)} slot(s) but devices {list(self.devices)}")


def _valid_name(name: str) -> bool:
    if _NAME.fullmatch(name):
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def parse_hostfile(text: str, source: str = "<hostfile>") -> dict[str, int]:
    """Ordered {host: slot_count}. `source` (a path) is used in messages."""
    pool: dict[str, int] = {}
    first_seen: dict[str, int] = {}
    for number, raw in enumerate(text.removeprefix("\ufeff").split("\n"), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source}:{number}"
        name, *after = line.split(None, 1)
        rest = after[0] if after else ""
        if not _valid_name(name):
            raise UserError(
                f"{where}: {name!r} is not a valid host name (use letters, digits, '.', '-', '_' "
                "not starting with '-', or an IP address)"
            )
        if not rest or rest.startswith("#"):
            raise UserError(f"{where}: host {name!r} has no slot count; write '{name} slots=N'")
        if not rest.startswith("slots="):
            raise UserError(f"{where}: expected 'HOSTNAME slots=N', got {line!r}")
        value, tail = _SLOTS_FIELD.fullmatch(rest).groups()  # type: ignore[union-attr]
        if not _SLOT.fullmatch(value):
            raise UserError(f"{where}: slots must be a positive integer, got 'slots={value}'")
        if int(value) == 0:
            raise UserError(
                f"{where}: host {name!r} has slots=0; a host needs at least 1 slot "
                "(delete the line to leave the host out)"
            )
        if tail and not tail.startswith("#"):
            raise UserError(
                f"{where}: unexpected {tail!r} after 'slots={value}'; only a '# comment' may follow"
            )
        if name in pool:
            raise UserError(
                f"{where}: host {name!r} is already listed on line {first_seen[name]}; "
                "give each host one line"
            )
        pool[name] = int(value)
        first_seen[name] = number
    if not pool:
        raise UserError(f"{source}: no hosts found; add lines like 'worker-0 slots=8'")
    return pool


def load_hostfile(path: str | os.PathLike) -> dict[str, int]:
    """Read + parse; a missing/unreadable file is a UserError naming the path."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"cannot read hostfile {os.fspath(path)}: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(
            f"{os.fspath(path)}: hostfile is not UTF-8 text (bad byte at offset {e.start})"
        ) from None
    return parse_hostfile(text, os.fspath(path))


def _slot_range(count: int) -> str:
    return "0" if count == 1 else f"0-{count - 1}"


def _parse_piece(piece: str, flag: str, spec: str) -> tuple[str, list[int] | None]:
    """`NAME[:SLOT,...]` -> (name, slots or None for a bare name)."""
    bad = f"{flag} {spec!r}: node spec {piece!r}"
    if piece.startswith("["):  # [IPv6]:slots
        name, closed, rest = piece[1:].partition("]")
        if not closed or (rest and not rest.startswith(":")):
            raise UserError(f"{bad} is malformed; write an IPv6 host as [ADDR] or [ADDR]:SLOT,...")
        slots_text = rest[1:] if rest else None
    else:
        if piece.count(":") > 1:
            raise UserError(
                f"{bad} has more than one ':'; write NAME:SLOT[,SLOT...] "
                "(an IPv6 host goes in brackets: [fe80::1]:0)"
            )
        name, colon, slots_text = piece.partition(":")
        slots_text = slots_text if colon else None
    name = name.strip()
    if not name:
        raise UserError(f"{bad} has no host name; write NAME[:SLOT,...]")
    if slots_text is None:
        return name, None
    if not slots_text.strip():
        raise UserError(f"{bad} has no slots after ':'; list slots (NAME:0,1) or drop the ':'")
    slots = []
    for token in slots_text.split(","):
        token = token.strip()
        if not token:
            raise UserError(f"{bad} has an empty slot (doubled or trailing ','); write NAME:0,1")
        if not _SLOT.fullmatch(token):
            raise UserError(f"{bad}: slot {token!r} is not a non-negative integer")
        slots.append(int(token))
    return name, slots


def _parse_spec(spec: str, flag: str, pool: dict[str, int]) -> dict[str, list[int] | None]:
    """Parse and check one --include/--exclude string against the hostfile's hosts."""
    nodes: dict[str, list[int] | None] = {}
    for index, piece in enumerate(spec.split("@"), start=1):
        piece = piece.strip()
        if not piece:
            raise UserError(
                f"{flag} {spec!r}: node spec #{index} is empty (a leading, trailing or doubled "
                "'@'); write NODE_SPEC[@NODE_SPEC...]"
            )
        name, slots = _parse_piece(piece, flag, spec)
        if name in nodes:
            raise UserError(
                f"{flag} {spec!r}: host {name!r} is listed twice; list each host once "
                f"(e.g. {name}:0,1)"
            )
        if name not in pool:
            close = difflib.get_close_matches(name, list(pool), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            known = ", ".join(list(pool)[:10])
            if len(pool) > 10:
                known += f", ... ({len(pool)} hosts)"
            raise UserError(
                f"{flag} {spec!r}: host {name!r} is not in the hostfile{hint}; known hosts: {known}"
            )
        for slot in slots or ():
            if slot >= pool[name]:
                raise UserError(
                    f"{flag} {spec!r}: host {name!r} has no slot {slot}; its slots are "
                    f"{_slot_range(pool[name])} (slots={pool[name]} in the hostfile)"
                )
        nodes[name] = slots
    return nodes


def select_hosts(
    pool: dict[str, int],
    include: str | None = None,
    exclude: str | None = None,
    num_nodes: int | None = None,
    num_procs: int | None = None,
) -> list[Host]:
    """Apply include/exclude (DeepSpeed grammar), then keep the first num_nodes hosts, then the first
    num_procs selected slots of each host. Result keeps hostfile order."""
    include, exclude = include or None, exclude or None
    if include is not None and exclude is not None:
        raise UserError(
            "--include and --exclude cannot be used together; "
            "use --include to pick hosts/slots or --exclude to leave some out"
        )
    selected = {name: set(range(count)) for name, count in pool.items()}
    if include is not None:
        chosen = _parse_spec(include, "--include", pool)
        selected = {
            name: set(range(pool[name]) if slots is None else slots) for name, slots in chosen.items()
        }
    elif exclude is not None:
        for name, slots in _parse_spec(exclude, "--exclude", pool).items():
            if slots is None:
                selected[name] = set()
                continue
            if len(set(slots)) != len(slots):
                twice = next(s for s in slots if slots.count(s) > 1)
                raise UserError(
                    f"--exclude {exclude!r}: slot {twice} of host {name!r} is listed twice; "
                    "list it once"
                )
            selected[name] -= set(slots)
    hosts = [Host(name, tuple(sorted(selected[name]))) for name in pool if selected.get(name)]
    if not hosts:
        if exclude is not None:
            raise UserError(f"--exclude {exclude!r} leaves no slot to run on; exclude less")
        raise UserError("no hosts to run on: the host list is empty")

    if num_nodes is not None:
        if num_nodes < 1:
            raise UserError(f"--num_nodes must be at least 1, got {num_nodes}")
        if num_nodes > len(hosts):
            names = ", ".join(h.name for h in hosts)
            raise UserError(
                f"--num_nodes {num_nodes}: only {len(hosts)} host(s) are selected ({names}); "
                "lower --num_nodes or add hosts"
            )
        hosts = hosts[:num_nodes]
    if num_procs is not None:
        if num_procs < 1:
            raise UserError(f"--num_procs must be at least 1, got {num_procs}")
        for host in hosts:
            if num_procs > len(host.slots):
                raise UserError(
                    f"--num_procs {num_procs}: host {host.name!r} has only {len(host.slots)} "
                    f"selected slot(s) {list(host.slots)}; lower --num_procs or select more slots"
                )
        hosts = [Host(h.name, h.slots[:num_procs]) for h in hosts]
    return hosts


def local_host(num_slots: int, name: str = "localhost", devices: Sequence[str] = ()) -> list[Host]:
    """The single-host selection of a run without a hostfile: slots 0..num_slots-1, on the first
    num_slots of `devices` (CUDA_VISIBLE_DEVICES entries such as MIG UUIDs, from `count_gpus` in
    topology/gpus.py) when there are that many, else on devices named by slot."""
    if num_slots < 1:
        raise UserError(f"{name} needs at least 1 slot, got {num_slots}")
    chosen = tuple(devices[:num_slots]) if len(devices) >= num_slots else ()
    return [Host(name, tuple(range(num_slots)), chosen)]


MIG_LIMIT = ("CUDA shows a process only one MIG instance, and every rank of a host gets the same "
             "CUDA_VISIBLE_DEVICES, so ranks after the first would find no device of their own")


def one_rank_per_mig(host: Host, explicit: bool) -> tuple[Host, str | None]:
    """`host`, or (procs_per_node auto) its first slot with a note why, when its devices include
    a MIG instance and it has more than one slot: see MIG_LIMIT. With an explicit procs_per_node
    that is a UserError (the caller names the field)."""
    if len(host.devices) < 2 or not any(d.startswith("MIG-") for d in host.devices):
        return host, None
    if explicit:
        raise UserError(f"procs_per_node is {len(host.devices)} on devices {','.join(host.devices)}, "
                        f"which include MIG instances: {MIG_LIMIT}; set procs_per_node to 1 "
                        f"(it runs on {host.devices[0]}) or use whole GPUs")
    first = Host(host.name, host.slots[:1], host.devices[:1])
    return first, (f"procs_per_node auto: 1 rank, on {host.devices[0]} of {','.join(host.devices)}: "
                   f"{MIG_LIMIT}")


def visible_host(devices: Sequence[str], num_procs: int | None = None, name: str = "localhost") -> list[Host]:
    """The single host of a local run started with CUDA_VISIBLE_DEVICES set and no hostfile (what
    DeepSpeed's launcher reads as `--include localhost:<those devices>`): one slot per listed
    device, the entries kept verbatim (indices, GPU UUIDs and MIG ids alike), or the first
    num_procs of them."""
    if not devices:
        raise UserError("CUDA_VISIBLE_DEVICES lists no device")
    if num_procs is not None and num_procs > len(devices):
        raise UserError(
            f"procs_per_node is {num_procs}, but CUDA_VISIBLE_DEVICES={','.join(devices)} (the "
            f"environment of dsl launch) lists {len(devices)} device(s); set procs_per_node to "
            f"{len(devices)} or fewer (auto: one rank per listed device), or list more devices")
    chosen = tuple(devices[:num_procs] if num_procs is not None else devices)
    return [Host(name, tuple(range(len(chosen))), chosen)]
