"""GPU smoke checks of dsl: does every GPU path of the launcher and the engine work on a real CUDA
machine? Written before anyone ran dsl on a GPU; run it there, read summary.json.

Usage (from the repository root, in the venv; `make test-gpu` runs the right ones):

    python tests/gpu/smoke.py                    # part 1: one process, one GPU (1-rank NCCL group)
    python tests/gpu/smoke.py --multi            # part 2: each check a torchrun of 2 ranks (--nproc N)
    torchrun --standalone --nproc_per_node 2 tests/gpu/smoke.py --multi   # the same part 2
    python tests/gpu/smoke.py --list             # the checks and what they do; runs nothing, no torch
    python tests/gpu/smoke.py --only env,offload # a subset (names from --list)
    python tests/gpu/smoke.py --device cpu [--multi]   # the self-test of this script (gloo, CPU)
    python tests/gpu/smoke.py --timeout-s compile=1800  # more time for one check (or S for all)

Isolation: the process started by the user runs no check itself and imports no torch; every
check runs in a fresh process (part 1: `smoke.py --run-check NAME` with RANK=0 WORLD_SIZE=1
LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=<free>; part 2: `torchrun --standalone` of N
processes), with a timeout, after which its whole process tree is killed. An exception, a CUDA
error, a crash (SIGSEGV/SIGABRT) or a hung kernel therefore fails that check alone, and the next
check starts clean. Inside a check, cases (e.g. each ZeRO stage) are isolated by exceptions only;
a sticky CUDA error makes that check's later cases fail too. Under torchrun, the process with
RANK 0 runs the checks (each again in a torchrun of WORLD_SIZE processes) and the others exit.

`--device cpu` hides the GPUs from every check (CUDA_VISIBLE_DEVICES=''), so the same checks run
on the CPU with gloo; a check whose subject only exists on a GPU runs its CPU analogue or is
skipped with the reason (see each check in checks_single.py / checks_multi.py).

Output, in $DSL_SMOKE_OUT (default smoke-results/; part 2 in its multi/ subfolder):
- summary.json: {"schema", "part", "device", "world_size", "ok", "counts": {pass, fail, skip},
  "duration_s", "started_at", "command", "hostname", "checks": [{name, status, reason,
  duration_s}]}; `ok` is true when no check failed (skips allowed).
- NAME.json per check: {name, description, part, status ("pass" | "fail" | "skip"), reason,
  duration_s, device, world_size, command, exit_code, timed_out, log, details, cases: [{name,
  status, reason, ...numbers: losses, reference, max_abs_diff, tol, bytes...}], error (a
  traceback), ranks (part 2: each rank's status), log_tail (a failure's last output)}.
- logs/NAME.log: everything the check's processes printed.
stdout gets one line per check and a total; exit code 0 when every check passed or was skipped,
1 when one failed, 2 for a usage error (unknown check, no GPU without --device cpu).

DSL_SMOKE_INJECT="NAME=raise,NAME=abort,NAME=hang" makes those checks raise, abort the process or
hang at their start: how the self-test (tests/integration/test_gpu_smoke_selftest.py) proves
the isolation.
"""

from __future__ import annotations

import argparse
import datetime
import difflib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
REPO = HERE.parents[2]
# Run as a script, this folder is sys.path[0]; import its modules as tests.gpu.* only.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE.parent]
sys.path.insert(0, str(REPO))

from tests.gpu import checks_single  # noqa: E402,F401,I001 - registers part 1 (first: --list order)
from tests.gpu import checks_multi  # noqa: E402,F401 - registers part 2
from tests.gpu.common import CHECKS, HELPERS, Check, Ctx, Skip, first_line  # noqa: E402

OUT_ENV = "DSL_SMOKE_OUT"
DEFAULT_OUT = "smoke-results"
INJECT_ENV = "DSL_SMOKE_INJECT"
SCHEMA = "dsl.gpu-smoke/1"
KILL_GRACE_S = 10.0
LOG_TAIL_LINES = 60
# What torchrun exports to its workers; a check's own torchrun must not inherit the outer one's.
RANK_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
             "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCH_NCCL_ASYNC_ERROR_HANDLING")


# Command line ---------------------------------------------------------------------------------


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tests/gpu/smoke.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--list", action="store_true", help="print the checks (name, part, description); run nothing")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cuda (default), or cpu: the self-test of this script on the CPU with gloo")
    p.add_argument("--only", default="", help="comma-separated check names to run (see --list)")
    p.add_argument("--multi", action="store_true", help="part 2: the checks that need 2+ GPUs, each a torchrun")
    p.add_argument("--nproc", type=int, default=None,
                   help="ranks per part-2 check (default: WORLD_SIZE under torchrun, else 2)")
    p.add_argument("--timeout-s", default=None, metavar="S | NAME=S,...",
                   help="a timeout for every check, or for the named ones (default: each check's own)")
    # Internal: what the harness starts.
    p.add_argument("--run-check", metavar="NAME", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--tmp", help=argparse.SUPPRESS)
    p.add_argument("--helper", help=argparse.SUPPRESS)
    p.add_argument("--args", default="{}", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    if args.helper:
        result = HELPERS[args.helper](json.loads(args.args))
        print("RESULT " + json.dumps(result, default=str), flush=True)
        return 0
    if args.run_check:
        return run_check(args.run_check, args.device, Path(args.out), Path(args.tmp), multi=args.multi)
    try:
        selected = select(args.only, None if args.list else ("multi" if args.multi else "single"))
        args.timeouts = timeouts(args.timeout_s, selected)
    except ValueError as exc:
        print(f"smoke.py: {exc}", file=sys.stderr)
        return 2
    if args.list:
        width = max(len(c.name) for c in selected)
        for c in selected:
            print(f"{c.name:<{width}}  {'1 GPU' if c.part == 'single' else '2+ GPUs':<7}  {c.description}")
        return 0
    return orchestrate(args, selected)


def select(only: str, part: str | None) -> list[Check]:
    """The checks of `part` (None: all), narrowed to `only`; ValueError names what is wrong."""
    pool = [c for c in CHECKS.values() if part is None or c.part == part]
    names = [n.strip() for n in only.split(",") if n.strip()]
    if not names:
        return pool
    known = {c.name for c in pool}
    for n in names:
        if n in known:
            continue
        if n in CHECKS:
            other = "--multi" if CHECKS[n].part == "multi" else "no --multi"
            raise ValueError(f"check {n!r} belongs to the other part: run it with {other}")
        close = difflib.get_close_matches(n, list(CHECKS), n=1)
        raise ValueError(f"unknown check {n!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                         + " (see --list)")
    return [c for c in pool if c.name in names]


def timeouts(text: str | None, selected: list[Check]) -> dict[str, float]:
    """Seconds per check: each check's own, or `S` for all, or `NAME=S,...` for the named ones."""
    out = {c.name: c.timeout_s for c in selected}
    if not text:
        return out
    try:
        if "=" not in text:
            return dict.fromkeys(out, float(text))
        for item in text.split(","):
            name, _, value = item.partition("=")
            if name.strip() not in out:
                raise ValueError(f"--timeout-s: {name.strip()!r} is not a selected check")
            out[name.strip()] = float(value)
    except ValueError as exc:
        message = str(exc) if "--timeout-s" in str(exc) else f"--timeout-s {text!r}: use S or NAME=S,..."
        raise ValueError(message) from None
    return out


# The harness: one process per check -----------------------------------------------------------


def _under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ)


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in RANK_VARS and not k.startswith("TORCHELASTIC_")}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cuda_devices() -> tuple[int, str]:
    """(CUDA devices torch sees, what went wrong) from a throw-away process: this one stays torch-free."""
    proc = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        return 0, lines[-1] if lines else f"python -c 'import torch' exited {proc.returncode}"
    return int(proc.stdout.strip() or 0), ""


def orchestrate(args: argparse.Namespace, selected: list[Check]) -> int:
    part = "multi" if args.multi else "single"
    if _under_torchrun():
        if not args.multi:
            print("smoke.py: part 1 runs one process on one GPU; start it without torchrun (or add --multi)",
                  file=sys.stderr)
            return 2
        if int(os.environ.get("RANK", "0")) != 0:
            return 0  # rank 0 runs every check, each in a torchrun of its own
    nproc = 1
    if args.multi:
        nproc = args.nproc or (int(os.environ["WORLD_SIZE"]) if _under_torchrun() else 2)
    if args.device == "cuda":
        found, why = _cuda_devices()
        if found < nproc:
            print(f"smoke.py: {'no CUDA device' if not found else f'{found} CUDA device(s)'} visible to torch"
                  f"{f' ({why})' if why else ''}, {nproc} needed; on a machine without GPUs run the self-test: "
                  "--device cpu", file=sys.stderr)
            return 2
    root = Path(os.environ.get(OUT_ENV) or DEFAULT_OUT).resolve()
    out = root / "multi" if args.multi else root
    (out / "logs").mkdir(parents=True, exist_ok=True)
    (out / "summary.json").unlink(missing_ok=True)
    started_at = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    t0 = time.monotonic()
    results = []
    for i, c in enumerate(selected, 1):
        timeout = args.timeouts[c.name]
        print(f"[{i}/{len(selected)}] {c.name} (timeout {timeout:g} s)", file=sys.stderr, flush=True)
        res = run_isolated(c, device=args.device, out=out, nproc=nproc if c.launch == "torchrun" else 1,
                           timeout_s=timeout)
        _write_json(out / f"{c.name}.json", res)
        results.append(res)
        print(f"{res['status'].upper():<4}  {c.name:<34} {res['duration_s']:7.1f}s  {res['reason']}", flush=True)
    counts = {s: sum(r["status"] == s for r in results) for s in ("pass", "fail", "skip")}
    summary = {
        "schema": SCHEMA, "part": part, "device": args.device, "world_size": nproc,
        "ok": counts["fail"] == 0, "counts": counts, "duration_s": round(time.monotonic() - t0, 1),
        "started_at": started_at, "command": [sys.executable, *sys.argv], "hostname": socket.gethostname(),
        "checks": [{k: r[k] for k in ("name", "status", "reason", "duration_s")} for r in results],
    }
    _write_json(out / "summary.json", summary)
    try:
        (out / "parts").rmdir()  # each check's folder of rank results is gone already
    except OSError:
        pass
    print(f"{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped in "
          f"{summary['duration_s']:.1f} s: {out / 'summary.json'}", flush=True)
    return 0 if summary["ok"] else 1


def run_isolated(c: Check, *, device: str, out: Path, nproc: int, timeout_s: float) -> dict[str, Any]:
    """Run one check in its own process (tree), wait at most `timeout_s`, and merge what its
    ranks wrote into the check's result."""
    parts = out / "parts" / c.name
    shutil.rmtree(parts, ignore_errors=True)
    parts.mkdir(parents=True)
    log = out / "logs" / f"{c.name}.log"
    env = _clean_env()
    env["PYTHONUNBUFFERED"] = "1"
    notes = []
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the self-test: torch sees no GPU, dist.setup() picks gloo
    if c.name == "compile" and env.pop("TORCHDYNAMO_DISABLE", None) is not None:
        notes.append("TORCHDYNAMO_DISABLE was set; removed for this check")
    # The check's scratch folder belongs to this process: a killed check cannot clean up after itself.
    scratch = Path(tempfile.mkdtemp(prefix=f"dsl-smoke-{c.name}-"))
    inner = [str(HERE), "--run-check", c.name, "--device", device, "--out", str(parts), "--tmp", str(scratch)]
    if c.launch == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
               f"--nproc-per-node={nproc}", *inner, "--multi"]
    else:
        cmd = [sys.executable, *inner]
        if c.part == "single":
            env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(_free_port()))
    t0 = time.monotonic()
    timed_out = False
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_tree(proc)
            rc = proc.returncode
        except BaseException:  # Ctrl-C: the check runs in a session of its own and would outlive us
            _kill_tree(proc)
            raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    duration = round(time.monotonic() - t0, 1)
    ranks = []
    for f in sorted(parts.glob("rank*.json"), key=lambda f: int(f.stem[4:]) if f.stem[4:].isdigit() else 0):
        try:
            ranks.append(json.loads(f.read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            ranks.append({"rank": f.stem, "status": "fail", "reason": f"unreadable result {f.name}: {exc}"})
    shutil.rmtree(parts, ignore_errors=True)
    status, reason = _merge(ranks, rc, timed_out, timeout_s, nproc, log)
    first = next((r for r in ranks if r.get("rank") == 0), ranks[0] if ranks else {})
    result = {
        "name": c.name, "description": c.description, "part": c.part, "status": status, "reason": reason,
        "duration_s": duration, "device": device, "world_size": nproc, "command": cmd, "exit_code": rc,
        "timed_out": timed_out, "log": str(log.relative_to(out)), "notes": notes,
        "details": first.get("details", {}), "cases": first.get("cases", []), "error": first.get("error"),
    }
    if len(ranks) > 1:
        result["ranks"] = [{k: r.get(k) for k in ("rank", "status", "reason", "error")} for r in ranks]
    if status == "fail":
        result["log_tail"] = _tail(log)
    return result


def _merge(ranks: list[dict], rc: int | None, timed_out: bool, timeout_s: float, nproc: int,
           log: Path) -> tuple[str, str]:
    if timed_out:
        return "fail", f"timed out after {timeout_s:g} s (process tree killed); see {log.name}"
    if not ranks:
        return "fail", f"no result: the process {_describe(rc)}; its output ends: {_last_words(log)[:300]}"
    bad = [r for r in ranks if r.get("status") == "fail"]
    if bad:
        r = bad[0]
        return "fail", (f"rank {r.get('rank')}: " if nproc > 1 else "") + str(r.get("reason"))
    if len(ranks) < nproc:
        return "fail", f"{nproc - len(ranks)} of {nproc} rank(s) wrote no result; the process {_describe(rc)}"
    if rc != 0:
        return "fail", f"the check finished ({ranks[0].get('status')}) but its process {_describe(rc)}"
    if all(r.get("status") == "skip" for r in ranks):
        return "skip", str(ranks[0].get("reason"))
    return "pass", str(ranks[0].get("reason"))


def _describe(rc: int | None) -> str:
    if rc is None:
        return "did not exit"
    if rc < 0:
        try:
            return f"was killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"was killed by signal {-rc}"
    return f"exited {rc}"


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGTERM the check's process and every descendant (torchrun puts its workers in sessions of
    their own, so a process group is not enough), then SIGKILL what is left."""
    import psutil

    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.Error:
        family = []
    for p in family:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(family, timeout=KILL_GRACE_S)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    proc.wait()


def _last_words(log: Path) -> str:
    """The most telling of the last lines of a log: torchrun's `exitcode : -6 (SIGABRT)` or an
    error line, else the last line that is not decoration."""
    lines = [ln.strip() for ln in _tail(log).splitlines() if ln.strip().strip("=-*")]
    for ln in reversed(lines):
        if ln.startswith("exitcode") or "Error" in ln or "error" in ln:
            return ln
    return lines[-1] if lines else "(nothing)"


def _tail(log: Path) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:])
    except OSError:
        return ""


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


# Inside the check's process -------------------------------------------------------------------


def _inject(name: str) -> None:
    """DSL_SMOKE_INJECT=NAME=raise|abort|hang,...: make check NAME fail on purpose."""
    for item in os.environ.get(INJECT_ENV, "").split(","):
        target, _, what = item.strip().partition("=")
        if target != name:
            continue
        if what == "raise":
            raise RuntimeError(f"deliberate failure ({INJECT_ENV})")
        if what == "abort":
            sys.stderr.write(f"{name}: aborting on purpose ({INJECT_ENV})\n")
            sys.stderr.flush()
            os.abort()
        if what == "hang":
            time.sleep(10**6)
        raise ValueError(f"{INJECT_ENV}: {item!r}: use NAME=raise, NAME=abort or NAME=hang")


def run_check(name: str, device: str, parts: Path, scratch: Path, *, multi: bool) -> int:
    """Run check `name` in this process and write parts/rank<R>.json (its status, details, cases);
    `scratch` is the harness's folder for it (this rank works in a subfolder)."""
    c = CHECKS[name]
    tmp = scratch / f"rank{os.environ.get('RANK', '0')}"
    tmp.mkdir(parents=True, exist_ok=True)
    ctx = Ctx(name=name, mode=device, tmp=tmp)
    t0 = time.monotonic()
    error = None
    try:
        _inject(name)
        c.fn(ctx)
        status, reason = ctx.verdict()
    except Skip as exc:
        status, reason = "skip", str(exc)
    except BaseException as exc:  # noqa: BLE001 - the check failed; write down why, whatever it was
        status, reason, error = "fail", first_line(exc), traceback.format_exc()
        print(error, file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = {"rank": ctx.rank, "status": status, "reason": reason, "duration_s": round(time.monotonic() - t0, 2),
              "details": ctx.details, "cases": ctx.cases, "error": error}
    _write_json(parts / f"rank{ctx.rank}.json", result)
    print(f"{name}: rank {ctx.rank}: {status}: {reason}", file=sys.stderr, flush=True)
    if status == "fail":
        # Other ranks may wait in a collective for this one: torchrun stops them when it exits.
        os._exit(1)
    if ctx.dist is not None:
        from dsl.engine import dist

        dist.teardown(ctx.dist)
    return 0


if __name__ == "__main__":
    sys.exit(main())
