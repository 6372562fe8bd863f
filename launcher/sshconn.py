"""Open fabric connections the way an operator expects ssh to behave.

fabric 3 accepts unknown host keys silently (paramiko's AutoAddPolicy). dsl does not: host keys
are checked against known_hosts (the spec's file, else ~/.ssh/known_hosts) and an unknown or
changed key refuses the host, unless the spec turns `strict_host_key_checking` off, which is
logged as a warning on every connection. ssh_config files (ProxyJump, per-host user and key)
are honoured through fabric's config loading.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

from dsl.engine.errors import UserError
from dsl.launcher.plan import SshTarget

log = logging.getLogger(__name__)


def connect(host: str, target: SshTarget):  # -> fabric.Connection
    """An open connection to `host`; failures are UserErrors naming the host and the fix."""
    import paramiko
    from fabric import Config, Connection

    overrides = {"load_ssh_configs": True}
    config = Config(runtime_ssh_path=target.config_file, overrides=overrides) if target.config_file \
        else Config(overrides=overrides)
    connect_kwargs: dict = {"banner_timeout": target.connect_timeout_s,
                            "auth_timeout": target.connect_timeout_s}
    if target.identity_file:
        connect_kwargs["key_filename"] = [target.identity_file]
    kwargs = {"connect_timeout": target.connect_timeout_s, "connect_kwargs": connect_kwargs,
              "config": config}
    if target.user:
        kwargs["user"] = target.user
    # An explicit spec port wins over ssh_config only when it is not the default.
    if target.port != 22 or not target.config_file:
        kwargs["port"] = target.port
    conn = Connection(host, **kwargs)
    client = conn.client
    if target.strict_host_key_checking:
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
    else:
        log.warning("%s: host key checking is OFF (resources.ssh.strict_host_key_checking: false); "
                    "a man-in-the-middle would not be noticed", host)
        client.set_missing_host_key_policy(paramiko.WarningPolicy())
    known = target.known_hosts or os.path.expanduser("~/.ssh/known_hosts")
    if Path(known).exists():
        client.load_host_keys(known)
    elif target.known_hosts:
        raise UserError(f"known_hosts file {known} does not exist (resources.ssh.known_hosts)")
    try:
        conn.open()
    except paramiko.BadHostKeyException as exc:
        raise UserError(f"{host}: host key CHANGED ({exc}); check the host, then update {known}") from None
    except paramiko.AuthenticationException as exc:
        raise UserError(f"{host}: ssh login refused for user {conn.user!r} ({exc}); check "
                        "resources.ssh.user and resources.ssh.identity_file") from None
    except paramiko.SSHException as exc:
        if "not found in known_hosts" in str(exc):
            raise UserError(f"{host}: host key unknown; add it to {known} (ssh-keyscan) or set "
                            "resources.ssh.known_hosts") from None
        raise UserError(f"{host}: ssh failed: {exc}") from None
    except socket.timeout:
        raise UserError(f"{host}: no answer on port {conn.port} within "
                        f"{target.connect_timeout_s:g} s (resources.ssh.connect_timeout_s); is the host up?") from None
    except socket.gaierror as exc:
        raise UserError(f"{host}: unknown host name ({exc.strerror}); check the hostfile") from None
    except OSError as exc:
        raise UserError(f"{host}: cannot connect to port {conn.port}: {exc.strerror or exc}") from None
    return conn
