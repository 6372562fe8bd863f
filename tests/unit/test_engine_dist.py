"""Process-group setup from torchrun's environment, and deliberate teardown."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as tdist

from dsl.engine import dist
from dsl.engine.errors import UserError

ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV:
        monkeypatch.delenv(name, raising=False)


def test_without_environment_runs_single_process_without_group() -> None:
    ctx = dist.setup()
    assert (ctx.rank, ctx.world_size, ctx.backend, ctx.device, ctx.created_group) == (0, 1, None, torch.device("cpu"), False)
    assert not tdist.is_initialized()
    dist.teardown(ctx)  # a no-op


def test_incomplete_environment_names_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="LOCAL_RANK, MASTER_ADDR, MASTER_PORT missing"):
        dist.setup()


def test_rank_outside_world_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(UserError, match=r"RANK \(2\) must lie in \[0, WORLD_SIZE \(2\)\)"):
        dist.setup()


def test_world_size_1_creates_a_gloo_group_and_teardown_destroys_it(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(name, value)
    ctx = dist.setup()
    try:
        assert ctx.created_group and ctx.backend == "gloo" and ctx.world_size == 1
        assert tdist.is_initialized() and tdist.get_backend() == "gloo"
        assert dist.current().backend == "gloo"
        t = torch.ones(3)
        tdist.all_reduce(t)
        assert t.tolist() == [1.0, 1.0, 1.0]
    finally:
        dist.teardown(ctx)
    assert not tdist.is_initialized()
