"""engine/cpu_alloc.py: with `cpu_allocator: reuse` a freed large tensor's pages are reused by the
next allocations (no page faults once the heap has settled, as in a training loop's steady
state), with `system` every allocation faults its pages in again.
Each case runs in its own process: the malloc setting is process-wide."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROBE = r"""
import json, resource, sys
import torch
from dsl.engine import initialize
from dsl.engine.model import Llama
from dsl.engine.train_config import ModelConfig

engine = initialize(Llama(ModelConfig(preset="tiny")), {"cpu_allocator": sys.argv[1]})
faults = []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.ones(16 * 2**20)  # 64 MiB: above glibc's largest mmap threshold
    del t
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
rss = []  # "return": a freed 2 MiB block leaves the resident set at once
for _ in range(3):
    t = torch.ones(512 * 1024)  # 2 MiB: below glibc's dynamic mmap threshold after a large free
    t.add_(1)
    before = int(open("/proc/self/statm").read().split()[1])
    del t
    rss.append(before - int(open("/proc/self/statm").read().split()[1]))
print(json.dumps({"reuse": engine.cpu_allocator_reuse, "return": engine.cpu_allocator_return,
                  "faults": faults, "returned_pages": rss}))
"""


def _probe(mode: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_reuse_keeps_freed_pages_and_system_does_not() -> None:
    pages = 64 * 2**20 // 4096
    reuse, system = _probe("reuse"), _probe("system")
    assert reuse["reuse"] is True and system["reuse"] is False
    # system: every 64 MiB allocation is a fresh mapping, all its pages fault in again
    assert all(f >= pages * 0.9 for f in system["faults"]), system
    # reuse: once the heap has settled (the first few rounds may still extend it), the same heap
    # pages come back already mapped
    assert all(f < pages * 0.05 for f in reuse["faults"][5:]), reuse


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_return_gives_a_freed_2_mib_block_back_and_reuse_keeps_it() -> None:
    pages = 2 * 2**20 // 4096
    ret, reuse = _probe("return"), _probe("reuse")
    assert ret["return"] is True and ret["reuse"] is False and reuse["return"] is False
    assert all(p >= pages * 0.9 for p in ret["returned_pages"]), ret
    assert all(p < pages * 0.1 for p in reuse["returned_pages"]), reuse


def test_cpu_allocator_set_for_a_gpu_rank_is_a_note() -> None:
    import torch

    from dsl.engine.config import EngineConfig
    from dsl.engine.core_config import device_notes

    notes = device_notes(EngineConfig(cpu_allocator="return"), torch.device("cuda", 0))
    assert notes == ["engine.cpu_allocator: return has no effect on cuda (it sets the host malloc of a rank that "
                     "trains on the CPU)"]
    assert device_notes(EngineConfig(), torch.device("cuda", 0)) == []


# jemalloc (engine/cpu_alloc.py): `cpu_allocator: auto` (the default) and `jemalloc` preload it.

def test_preload_env_prepends_jemalloc_keeps_the_users_conf_and_runs_once() -> None:
    from dsl.engine import cpu_alloc

    lib = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
    env = cpu_alloc.preload_env("auto", {"PATH": "/bin", "LD_PRELOAD": "/opt/x.so"}, lib)
    assert env["LD_PRELOAD"] == f"{lib}:/opt/x.so" and env["PATH"] == "/bin"
    assert env["MALLOC_CONF"] == cpu_alloc.JEMALLOC_CONF and env[cpu_alloc.PRELOADED_ENV] == "1"
    assert cpu_alloc.preload_env("jemalloc", {"MALLOC_CONF": "narenas:1"}, lib)["MALLOC_CONF"] == "narenas:1"
    assert cpu_alloc.preload_env("auto", env, lib) is None  # already re-executed
    assert cpu_alloc.preload_env("auto", {}, lib, on_gpu_host=True) is None  # the device is a GPU
    for setting in ("reuse", "system", "return"):
        assert cpu_alloc.preload_env(setting, {}, lib) is None
    assert cpu_alloc.preload_env("auto", {}, None) is None  # auto falls back (the trainer prints a note)
    with pytest.raises(ValueError, match="apt install libjemalloc2"):
        cpu_alloc.preload_env("jemalloc", {}, None)


REEXEC = r"""
import json, os, signal, sys
from dsl.engine import cpu_alloc
if not os.environ.get(cpu_alloc.PRELOADED_ENV):
    print(json.dumps({"first_pid": os.getpid(), "active": cpu_alloc.jemalloc_active()}), flush=True)
    # a warning signal arriving just before the exec: blocked (pending) across it, as the trainer does
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])
    os.kill(os.getpid(), signal.SIGUSR1)
    cpu_alloc.reexec_with_jemalloc(sys.argv[1], (signal.SIGUSR1,))
    print(json.dumps({"not_reexecuted": True}), flush=True)
    sys.exit(0)
got = []
signal.signal(signal.SIGUSR1, lambda *_: got.append(1))
blocked = signal.SIGUSR1 in signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGUSR1])
import torch
from dsl.engine import initialize
from dsl.engine.model import Llama
from dsl.engine.train_config import ModelConfig
engine = initialize(Llama(ModelConfig(preset="tiny")), {"cpu_allocator": "reuse"})
print(json.dumps({"pid": os.getpid(), "active": cpu_alloc.jemalloc_active(), "blocked": blocked, "got": len(got),
                  "conf": os.environ["MALLOC_CONF"], "effective": engine.cpu_allocator}), flush=True)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD")
def test_reexec_preloads_jemalloc_in_the_same_process_and_keeps_a_pending_warning_signal() -> None:
    from dsl.engine import cpu_alloc

    # make test installs libjemalloc2 (tests/cluster/install.sh): its absence is a failure here
    assert cpu_alloc.find_jemalloc() is not None, "apt install libjemalloc2 (make test runs tests/cluster/install.sh)"
    proc = subprocess.run([sys.executable, "-c", REEXEC, "auto"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    first, second = (json.loads(line) for line in proc.stdout.strip().splitlines())
    assert first["active"] is False and second["active"] is True
    assert second["pid"] == first["first_pid"]  # exec, not a child: torchrun and mpirun still see their rank
    assert second["blocked"] is True and second["got"] == 1  # delivered to the new process's handler
    assert second["conf"] == cpu_alloc.JEMALLOC_CONF
    # `reuse` set explicitly in a process whose malloc is jemalloc: jemalloc it is, with a note
    assert second["effective"] == "jemalloc"
    assert "engine.cpu_allocator: reuse has no effect: jemalloc is this process's malloc" in proc.stderr


def test_reuse_setting_does_not_reexecute() -> None:
    proc = subprocess.run([sys.executable, "-c", REEXEC, "reuse"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"not_reexecuted": True}


def test_trainer_without_jemalloc_stops_under_jemalloc_and_notes_the_fallback_under_auto(monkeypatch, capsys) -> None:
    from dsl.engine import cpu_alloc, train
    from dsl.engine.errors import UserError

    monkeypatch.setattr(cpu_alloc, "find_jemalloc", lambda: None)
    monkeypatch.setattr(cpu_alloc, "gpu_host", lambda environ=None: False)
    monkeypatch.delenv(cpu_alloc.PRELOADED_ENV, raising=False)
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(UserError, match="engine.cpu_allocator: jemalloc, but libjemalloc.so.2 is not on this host"):
        train._preload_allocator("jemalloc")
    train._preload_allocator("auto")  # no exec: nothing to preload
    err = capsys.readouterr().err
    assert "engine.cpu_allocator: auto found no libjemalloc.so.2 on this host" in err and "reuse" in err
    monkeypatch.setenv("RANK", "1")
    train._preload_allocator("auto")
    assert capsys.readouterr().err == ""  # rank 0 says it once


def test_a_failed_reexec_leaves_the_process_running_with_its_signals_unblocked(monkeypatch, capsys) -> None:
    import os
    import signal

    from dsl.engine import cpu_alloc

    def refuse(*_):
        raise PermissionError("exec refused")

    monkeypatch.setattr(cpu_alloc, "find_jemalloc", lambda: "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    monkeypatch.setattr(cpu_alloc, "gpu_host", lambda environ=None: False)
    monkeypatch.delenv(cpu_alloc.PRELOADED_ENV, raising=False)
    monkeypatch.setattr(os, "execve", refuse)
    cpu_alloc.reexec_with_jemalloc("auto", (signal.SIGUSR1,))
    assert signal.SIGUSR1 not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    assert "could not re-execute with libjemalloc.so.2 preloaded (exec refused)" in capsys.readouterr().err
