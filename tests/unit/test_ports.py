from __future__ import annotations

import socket

import pytest

from dsl.engine.errors import UserError
from dsl.launcher.ports import hold_port, reserve_port


def test_reservations_never_repeat_while_held():
    held = [reserve_port() for _ in range(20)]
    try:
        ports = [r.port for r in held]
        assert len(set(ports)) == 20
        # A port held by one launch cannot be fixed by another.
        with pytest.raises(UserError, match=f"master_port {ports[0]} is in use"):
            hold_port(ports[0])
    finally:
        for r in held:
            r.release()
    again = hold_port(held[0].port)  # released -> available again
    again.release()


def test_busy_port_is_refused():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        with pytest.raises(UserError, match="is in use"):
            hold_port(sock.getsockname()[1])
