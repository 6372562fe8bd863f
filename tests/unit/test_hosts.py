"""dsl.launcher.hosts: DeepSpeed's answers on valid input, clear UserErrors where DeepSpeed is wrong."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from dsl.engine.errors import UserError
from dsl.launcher.hosts import Host, load_hostfile, local_host, parse_hostfile, select_hosts

GOLDEN = json.loads((Path(__file__).parents[1] / "fixtures" / "deepspeed_hosts.json").read_text())
POOL = {"node-a": 4, "node-b": 2, "node-c": 8}


def error(fn, *args, **kwargs) -> str:
    with pytest.raises(UserError) as info:
        fn(*args, **kwargs)
    return str(info.value)


def select_error(**kwargs) -> str:
    return error(select_hosts, POOL, **kwargs)


# --- golden: same hosts and slots as DeepSpeed 0.19.8 ---------------------------------------


def test_golden_file_is_deepspeed_0_19_8():
    assert GOLDEN["deepspeed_version"] == "0.19.8"
    assert len(GOLDEN["cases"]) >= 25


@pytest.mark.parametrize("case", GOLDEN["cases"], ids=[c["name"] for c in GOLDEN["cases"]])
def test_matches_deepspeed(case):
    pool = parse_hostfile(case["hostfile"], "hostfile")
    hosts = select_hosts(
        pool,
        include=case["include"],
        exclude=case["exclude"],
        num_nodes=case["num_nodes"],
        num_procs=case["num_gpus"],
    )
    assert [[h.name, list(h.slots)] for h in hosts] == case["expected"]


# --- valid input beyond DeepSpeed ------------------------------------------------------------


def test_num_procs_keeps_first_selected_slots():
    # DeepSpeed's --num_gpus 1 would give node-c slot [0], which the include left out.
    assert select_hosts(POOL, include="node-c:1,3", num_procs=1) == [Host("node-c", (1,))]


def test_num_nodes_counts_selected_hosts():
    assert select_hosts(POOL, exclude="node-a", num_nodes=1) == [Host("node-b", (0, 1))]


def test_empty_include_exclude_means_absent():
    assert select_hosts(POOL, include="", exclude="") == select_hosts(POOL)


def test_bom_and_crlf():
    assert parse_hostfile("\ufeffa slots=2\r\nb slots=1\r\n") == {"a": 2, "b": 1}


def test_load_hostfile_reads_bom_file(tmp_path):
    path = tmp_path / "hostfile"
    path.write_bytes(b"\xef\xbb\xbfa slots=2\r\n# c\r\nb slots=1\r\n")
    assert load_hostfile(path) == {"a": 2, "b": 1}


def test_ipv6_in_brackets():
    pool = parse_hostfile("fe80::1 slots=2\n::1 slots=4\n")
    assert select_hosts(pool, include="[::1]:1,3@[fe80::1]") == [
        Host("fe80::1", (0, 1)),
        Host("::1", (1, 3)),
    ]


def test_local_host():
    assert local_host(2) == [Host("localhost", (0, 1))]
    assert "at least 1 slot" in error(local_host, 0)


# --- hostfile errors: "<path>:<line>: ..." ---------------------------------------------------


def test_missing_hostfile_names_path(tmp_path):
    path = tmp_path / "nope"
    assert re.search(rf"cannot read hostfile {re.escape(str(path))}: No such file", error(load_hostfile, path))


def test_hostfile_error_uses_path_and_line(tmp_path):
    path = tmp_path / "hosts"
    path.write_text("a slots=2\nb slots=x\n")
    assert error(load_hostfile, path) == f"{path}:2: slots must be a positive integer, got 'slots=x'"


def test_non_utf8_hostfile(tmp_path):
    path = tmp_path / "hosts"
    path.write_bytes(b"a slots=2\n\xff slots=1\n")
    assert "not UTF-8" in error(load_hostfile, path)


def test_duplicate_host():
    msg = error(parse_hostfile, "a slots=2\n# x\na slots=4\n", "hf")
    assert msg.startswith("hf:3: host 'a' is already listed on line 1")


def test_bad_line():
    assert error(parse_hostfile, "a slots=2\nb max_slots=4\n", "hf").startswith(
        "hf:2: expected 'HOSTNAME slots=N', got 'b max_slots=4'"
    )


def test_host_without_slots():
    assert error(parse_hostfile, "a\n", "hf") == "hf:1: host 'a' has no slot count; write 'a slots=N'"


def test_empty_hostfile():
    assert error(parse_hostfile, "# only comments\n\n", "hf").startswith("hf: no hosts found")


def test_zero_slots():
    assert error(parse_hostfile, "a slots=1\n\nb slots=0\n", "hf").startswith("hf:3: host 'b' has slots=0")


@pytest.mark.parametrize("line", ["a slots=4gpu", "a slots=-1", "a slots="])
def test_slot_count_not_a_positive_integer(line):
    assert error(parse_hostfile, line, "hf").startswith("hf:1: slots must be a positive integer")


def test_trailing_garbage():
    msg = error(parse_hostfile, "a slots=4 extra\n", "hf")
    assert msg == "hf:1: unexpected 'extra' after 'slots=4'; only a '# comment' may follow"
    assert parse_hostfile("a slots=4 # fine\nb slots=1#fine") == {"a": 4, "b": 1}


@pytest.mark.parametrize("name", ["-oProxyCommand=x", "a/b", "host$1", "ünï"])
def test_invalid_host_name(name):
    msg = error(parse_hostfile, f"ok slots=1\n{name} slots=1\n", "hf")
    assert msg.startswith(f"hf:2: {name!r} is not a valid host name")


# --- include/exclude errors -----------------------------------------------------------------


def test_include_and_exclude_together():
    msg = select_error(include="node-a", exclude="node-b")
    assert "--include and --exclude cannot be used together" in msg


@pytest.mark.parametrize("flag", ["include", "exclude"])
def test_unknown_host_with_suggestion(flag):
    msg = select_error(**{flag: "node-a@nod-c:1"})
    assert f"--{flag} 'node-a@nod-c:1': host 'nod-c' is not in the hostfile" in msg
    assert "did you mean 'node-c'?" in msg
    assert "known hosts: node-a, node-b, node-c" in msg


def test_unknown_host_without_suggestion():
    msg = select_error(include="zzz")
    assert "host 'zzz' is not in the hostfile; known hosts: node-a, node-b, node-c" in msg


@pytest.mark.parametrize("flag", ["include", "exclude"])
def test_slot_out_of_range(flag):
    msg = select_error(**{flag: "node-a:1,4"})
    assert "host 'node-a' has no slot 4; its slots are 0-3 (slots=4 in the hostfile)" in msg
    assert msg.startswith(f"--{flag} ")


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("node-a:x", "node spec 'node-a:x': slot 'x' is not a non-negative integer"),
        ("node-a:-1", "node spec 'node-a:-1': slot '-1' is not a non-negative integer"),
        ("node-a:1.5", "slot '1.5' is not a non-negative integer"),
        ("node-a@@node-b", "node spec #2 is empty"),
        ("node-a@", "node spec #2 is empty"),
        ("@node-a", "node spec #1 is empty"),
        ("node-a:", "node spec 'node-a:' has no slots after ':'"),
        ("node-a:1,,2", "node spec 'node-a:1,,2' has an empty slot"),
        ("node-a:1,", "node spec 'node-a:1,' has an empty slot"),
        ("node-a:1:2", "node spec 'node-a:1:2' has more than one ':'"),
        (":1", "node spec ':1' has no host name"),
        ("[::1:0", "node spec '[::1:0' is malformed"),
    ],
)
def test_malformed_piece(spec, expected):
    msg = select_error(include=spec)
    assert msg.startswith(f"--include {spec!r}: ")
    assert expected in msg


@pytest.mark.parametrize("flag", ["include", "exclude"])
def test_host_listed_twice(flag):
    msg = select_error(**{flag: "node-a@node-b@node-a:1"})
    assert "host 'node-a' is listed twice" in msg
    assert msg.startswith(f"--{flag} ")


def test_exclude_same_slot_twice():
    msg = select_error(exclude="node-a:1,1")
    assert msg.startswith("--exclude 'node-a:1,1': slot 1 of host 'node-a' is listed twice")


def test_exclude_everything():
    msg = select_error(exclude="node-a@node-b:0,1@node-c")
    assert "leaves no slot to run on" in msg


# --- num_nodes / num_procs errors -----------------------------------------------------------


def test_num_procs_more_than_selected_slots():
    msg = select_error(include="node-a:1,3@node-c", num_procs=3)
    assert "--num_procs 3: host 'node-a' has only 2 selected slot(s) [1, 3]" in msg


def test_num_procs_more_than_host_slots():
    assert "host 'node-b' has only 2 selected slot(s)" in select_error(num_procs=4)


def test_num_nodes_more_than_hosts():
    msg = select_error(exclude="node-b", num_nodes=3)
    assert "--num_nodes 3: only 2 host(s) are selected (node-a, node-c)" in msg


@pytest.mark.parametrize("flag", ["num_nodes", "num_procs"])
@pytest.mark.parametrize("value", [0, -1])
def test_counts_below_one(flag, value):
    assert select_error(**{flag: value}) == f"--{flag} must be at least 1, got {value}"
