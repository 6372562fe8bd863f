"""The demo trainer the launcher runs on every rank: `python -m dsl.engine.train SPEC.yaml`.

SPEC.yaml is the full resolved dsl spec the launcher wrote; this reads only `run.train`
(`TrainConfig`), `engine` (`EngineConfig`) and `output_dir`, and ignores every other key (they
belong to the launcher, which validated them already). An invalid section prints one located
message (`file:line:col run.train.steps: ...`) to stderr and exits 2, before torch is imported.

Then, on every rank: process group from torchrun's environment (`dist.setup`); data-parallel
size dp = world_size / engine.sequence_parallel, and `engine.train_batch` (when set) must equal
micro_batch x grad_accum x dp; the same model weights everywhere (`torch.manual_seed(
TrainConfig.seed)` before building the Llama model, or the Hugging Face model `run.train.model:
{hf: DIR}` names, engine/hf_model.py; the engine also broadcasts from rank 0), with
per-layer activation checkpointing when `engine.activation_checkpointing` is true ("auto" is the
planner's to resolve and stays off here); the optimizer and learning-rate schedule of
`engine.optimizer` / `engine.scheduler`, the decay ending at `run.train.steps`; `steps` optimizer
steps of `grad_accum` micro-batches of `micro_batch` x `seq_len` tokens, each rank reading its
slice of the global batch by global sample index (see engine/data.py).

Checkpoints: with `checkpoint_every` set, every that many steps and at the last step every rank
calls `engine.save_checkpoint(output_dir/checkpoints, step=, extra=, keep=keep_checkpoints)`;
`extra` holds the data position (`samples_seen`, `global_batch`, the data section). With
`resume` (the default) and output_dir/checkpoints/latest present, the run starts with
`engine.load_checkpoint` and continues after the returned step, reading the data from
`samples_seen` on (so a run can resume on another number of ranks), and says so on stderr.
metrics.jsonl is appended to, so a resumed run continues its rows.

Output of rank 0 (the other ranks print nothing):
- stdout, every `log_every` steps and at the last step, one line the launcher parses with
  `^step (\\d+)/(\\d+) \\| loss ([0-9.]+)`:
      step 120/300 | loss 2.3456 | lr 2.50e-03 | 12,345 tok/s | eta 0:07
  loss is that step's loss averaged over micro-batches and ranks (an all_reduce on log steps
  only); tok/s counts the tokens of all ranks over the interval since the previous line.
- `{output_dir}/metrics.jsonl`, one JSON object per printed line: step, loss, lr, tokens_per_s,
  elapsed_s (seconds since the first step of this process started), grad_norm (before clipping),
  and each rank's peak memory so far, lists in rank order (engine/peak.py: host_peak_rss_bytes,
  device_peak_allocated_bytes / device_peak_reserved_bytes, 0 off CUDA, host_peak_anon_bytes)
  with the memory model's predicted_peak_bytes for one rank; the progress line adds `| peak X GiB
  > plan Y GiB` when a rank's peak (on a CPU device the resident set less the libraries' file
  pages, CUDA reserved on a GPU) passes the prediction by more than the model's accuracy
  (engine/peak.py PEAK_TOLERANCE, 10%; the summary shows every rank's ratio).
- stdout at the end: a summary table (rich, rendered as plain text when piped), with every
  rank's measured peak against the prediction.

Time limits (SIGUSR1 / SIGUSR2): Slurm's `--signal=USR1@T` (resources.slurm.signal_before_end_s)
and `dsl launch --time-limit` warn the ranks with SIGUSR1 before a job's time limit. The handler
only stores the signal number into a preallocated slot (no I/O, import, lock or allocation: it
runs between two bytecodes of whatever the main thread was doing, possibly inside an import or a
collective); run as `python -m dsl.engine.train` it is installed before anything else is
imported. At the end of every optimizer step the ranks agree on that slot (one all_reduce MAX of
a preallocated 1-element int32 tensor; none with one rank), so all of them stop after the same
step: every rank calls `engine.save_checkpoint` (once, also when that step was a
`checkpoint_every` step), the step is logged like a `log_every` step, rank 0 prints why on stderr

    dsl.engine.train: SIGUSR1 received: checkpointed step 37 to OUT/checkpoints; exiting with
    code 75 (checkpointed at a time-limit signal): launch again to resume

and every rank exits with EXIT_CHECKPOINTED = 75 (defined in engine/wire.py: "checkpointed,
resume me"; none of 0 = done, 1 = failure, 2 = bad spec, 128+N = killed by signal N). The next
start with the same output_dir resumes from that checkpoint (run.train.resume, on by default); a
Slurm batch script with `requeue: true` requeues the job on this code (launcher/slurm.py). A
signal during the last step changes nothing: the run finishes and exits 0. The agreement costs
one 4-byte all_reduce per step, a latency of a fraction of a millisecond on gloo, against steps
of tens of milliseconds (the tiny preset on CPU) and more; checking only every N steps would
save little and delay the checkpoint by up to N steps.

Exit 0 on success, 2 on a bad spec, 75 (EXIT_CHECKPOINTED) after a checkpoint at a time-limit
signal.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

# The time-limit warning received so far (0: none). A list made once, so the handler only stores
# an int into it: Python runs the handler between two bytecodes of the main thread, possibly in the
# middle of an import, a logging call or a collective, where anything more could re-enter them.
_received = [0]


def _on_warning(signum: int, _frame: object) -> None:
    _received[0] = signum


if __name__ == "__main__":
    # Run as a rank (`python -m dsl.engine.train`): catch the warning before the imports below
    # (SIGUSR1's default action would end the rank; pydantic and then torch take a while).
    for _sig in (signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(_sig, _on_warning)

from dsl.engine.config import EngineConfig
from dsl.engine.wire import EXIT_CHECKPOINTED, WARNING_SIGNALS
from dsl.engine.train_config import TrainConfig
from dsl.engine.errors import DslError, UserError
from dsl.engine.located import load_located, validate_located
from dsl.engine.validity import Refusal, model_problems, problems, refuse, refuse_located
from dsl.engine.wire import heartbeat
from dsl.engine.train_output import (  # noqa: F401 - format_progress and format_duration: public here too
    _close_metrics, _open_metrics, _peak_of, _print_summary, _signal_name, _write_metrics, format_duration,
    format_progress,
)

__all__ = ["RunSpec", "load_run_spec", "format_progress", "train", "main", "EXIT_CHECKPOINTED",
           "WARNING_SIGNALS"]

PROG = "dsl.engine.train"


@dataclass(frozen=True)
class RunSpec:
    """The parts of a resolved spec the trainer uses."""

    train: TrainConfig
    engine: EngineConfig
    output_dir: Path
    locations: Any = field(default=None, compare=False, repr=False)
    """Where each field is written in the spec file (engine/located.py), to locate the problems
    the engine finds only once the model is built (engine/validity.py `Refusal`)."""


# Spec loading (torch-free) ---------------------------------------------------------------


def load_run_spec(path: str | Path, world_size: int | None = None, ranks_per_host: int | None = None) -> RunSpec:
    """Read `run.train`, `engine` and `output_dir` of a resolved spec. Raises UserError. With
    `world_size` / `ranks_per_host` (the rank's environment: `world_of_environment`) the rules
    about the ranks take part too."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise UserError(f"cannot read spec {path}: {err.strerror}") from None
    doc, locations = load_located(text, str(path))
    if not isinstance(doc, dict):
        raise UserError(f"{path}: a spec is a mapping of keys (run, engine, output_dir, ...)")
    run = doc.get("run") or {}
    if not isinstance(run, dict):
        raise UserError(f"{locations.where(('run',))} run: must be a mapping")
    train_cfg = validate_located(TrainConfig, run.get("train") or {}, locations, ("run", "train"))
    engine = validate_located(EngineConfig, doc.get("engine") or {}, locations, ("engine",))
    output_dir = doc.get("output_dir")
    if not isinstance(output_dir, str) or not output_dir:
        raise UserError(f"{locations.where(('output_dir',))} output_dir: a directory path "
                        f"(string) is required, got {output_dir!r}")
    # The rules `dsl validate` and `dsl launch` checked (engine/validity.py), located in this file;
    # a counts model (nothing to build) and a Hugging Face one without dsl[hf] installed are refused.
    llama = train_cfg.model if train_cfg.model.form == "llama" else None
    refuse_located(problems(engine, model=llama, world_size=world_size, ranks_per_host=ranks_per_host)
                   + model_problems(train_cfg.model, check_installed=True), locations)
    if train_cfg.model.form == "hf":
        train_cfg = train_cfg.model_copy(update={"model": _hf_absolute(train_cfg.model, path, locations)})
    if train_cfg.init_from is not None:
        train_cfg = train_cfg.model_copy(update={"init_from": _init_from_absolute(train_cfg.init_from, path,
                                                                                  locations)})
    return RunSpec(train=train_cfg, engine=engine, output_dir=Path(output_dir), locations=locations)


def _hf_absolute(model: Any, spec_path: Path, locations: Any) -> Any:
    """`model` (hf / hf_config) with its path made absolute from the spec file's folder, its
    config.json read (a located error when it is missing or not JSON)."""
    from dsl.engine.modeldesc.registry import read_config

    name = "hf" if model.hf is not None else "hf_config"
    written = Path(str(getattr(model, name))).expanduser()
    absolute = (written if written.is_absolute() else spec_path.parent / written).resolve()
    read_config(absolute / "config.json" if name == "hf" else absolute,
                f"{locations.where(('run', 'train', 'model', name))} run.train.model.{name}")
    return model.model_copy(update={name: str(absolute)})


def _init_from_absolute(init: Any, spec_path: Path, locations: Any) -> Any:
    """run.train.init_from with its folder made absolute from the spec file's folder; a folder
    that does not exist is a located error."""
    name = "deepspeed" if init.deepspeed is not None else "hf"
    written = Path(str(getattr(init, name))).expanduser()
    absolute = (written if written.is_absolute() else spec_path.parent / written).resolve()
    if not absolute.is_dir():
        raise UserError(f"{locations.where(('run', 'train', 'init_from', name))} run.train.init_from.{name}: "
                        f"no such folder: {absolute}")
    return init.model_copy(update={name: str(absolute)})


def _import_deepspeed_once(init: Any, checkpoint_dir: Path, rank: int, world_size: int) -> None:
    """Rank 0 imports run.train.init_from.deepspeed into `checkpoint_dir` (engine/ds_import.py);
    every rank learns whether it worked (an error on rank 0 is raised on every rank)."""
    from dsl.engine import ds_import

    failure = ""
    if rank == 0:
        try:
            ds_import.import_deepspeed(init.deepspeed, checkpoint_dir, optimizer=init.optimizer)
        except UserError as err:
            failure = str(err)
    if world_size > 1:
        import torch.distributed as tdist

        box = [failure]
        tdist.broadcast_object_list(box, src=0)
        failure = box[0]
    if failure:
        raise UserError(f"run.train.init_from.deepspeed: {failure}")


def world_of_environment() -> tuple[int | None, int | None]:
    """(ranks, ranks per host) as torchrun / dsl launch export them (WORLD_SIZE, LOCAL_WORLD_SIZE);
    (1, 1) for a single process without them; None for a value dist.setup will refuse."""
    if "WORLD_SIZE" not in os.environ:
        return 1, 1

    def count(name: str) -> int | None:
        text = os.environ.get(name, os.environ["WORLD_SIZE"])  # dist.setup's default for LOCAL_WORLD_SIZE
        return int(text) if text.isdigit() and int(text) > 0 else None

    return count("WORLD_SIZE"), count("LOCAL_WORLD_SIZE")


# Time-limit signals (the handler is at the top of the module) -------------------------------


def install_warning_handlers() -> dict[int, Any]:
    """SIGUSR1/SIGUSR2 -> remember the signal (see the module docstring). Returns the previous
    handlers for `restore_handlers`. Main thread only; a no-op elsewhere."""
    if threading.current_thread() is not threading.main_thread():
        return {}  # train() called from a thread: the caller owns signal handling
    previous = {sig: signal.signal(sig, _on_warning) for sig in WARNING_SIGNALS}
    if any(handler is not _on_warning for handler in previous.values()):
        _received[0] = 0  # newly installed; a signal caught since the early install is kept
    return previous


def restore_handlers(previous: dict[int, Any]) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, signal.SIG_DFL if handler is None else handler)


# Training --------------------------------------------------------------------------------


def data_parallel_size(engine: EngineConfig, world_size: int) -> int:
    """Ranks that read different samples: world_size / sequence_parallel. Raises UserError
    (engine/validity.py's rules about the ranks)."""
    about_ranks = (("sequence_parallel",), ("train_batch",))
    refuse([p for p in problems(engine, world_size=world_size) if p.path in about_ranks])
    sp = 1 if engine.sequence_parallel == "auto" else engine.sequence_parallel
    return world_size // sp


def _require_checkpoints(engine: Any, why: str) -> None:
    # Engine.save_checkpoint/load_checkpoint are added to engine/core.py separately; an engine
    # without them must fail here, before training, not at the first checkpoint step.
    if not (hasattr(engine, "save_checkpoint") and hasattr(engine, "load_checkpoint")):
        raise UserError(f"{why}, but this version of the engine cannot save or load checkpoints")


def train(spec: RunSpec, *, out: TextIO | None = None) -> dict[str, Any]:
    """Run the whole training on this rank; returns the summary (on every rank).

    Creates and tears down the process group when the environment describes one. Resumes from
    output_dir/checkpoints/latest when `run.train.resume` is set and it exists.
    """
    import torch

    from dsl.engine import dist, peak
    from dsl.engine.core import initialize
    from dsl.engine.data import open_data
    from dsl.engine.model import Llama

    out = sys.stdout if out is None else out
    tcfg, ecfg = spec.train, spec.engine
    ctx = dist.setup()
    if "OMP_NUM_THREADS" not in os.environ:
        # The launcher sets OMP_NUM_THREADS; without it, ranks sharing a host would each start
        # one thread per core and oversubscribe the CPU.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ctx.local_world_size))
    dp = data_parallel_size(ecfg, ctx.world_size)
    sp = ctx.world_size // dp
    # Consecutive ranks form a sequence-parallel group and read the same samples.
    dp_rank = ctx.rank // sp

    torch.manual_seed(tcfg.seed)  # same initial weights on every rank
    # activation_checkpointing "auto" is the planner's to decide; unresolved, it stays off.
    if tcfg.model.form == "hf":  # engine/long/setup.py applies activation checkpointing to it
        from dsl.engine import hf_model

        weights = tcfg.init_from.hf if tcfg.init_from is not None else None
        model = hf_model.build(tcfg.model, seed=tcfg.seed, weights_from=weights)
    else:
        model = Llama(tcfg.model, activation_checkpointing=ecfg.activation_checkpointing is True)
    # lr, weight decay and the schedule come from engine.optimizer / engine.scheduler; the
    # schedule's decay ends at run.train.steps.
    try:
        engine = initialize(model, ecfg, total_steps=tcfg.steps)
    except Refusal as err:  # a setting this model cannot take (engine/long/setup.py): where the spec says it
        if spec.locations is None:
            raise
        refuse_located(err.problems, spec.locations)

    checkpoint_dir = spec.output_dir / "checkpoints"
    if tcfg.checkpoint_every is not None:
        _require_checkpoints(engine, "run.train.checkpoint_every is set")
    start_step = resume_sample = 0
    resumed_data = None
    imported = False
    if tcfg.init_from is not None and tcfg.init_from.deepspeed and not (checkpoint_dir / "latest").exists():
        _require_checkpoints(engine, "run.train.init_from.deepspeed is set")
        _import_deepspeed_once(tcfg.init_from, checkpoint_dir, ctx.rank, ctx.world_size)
        imported = True
    if (tcfg.resume or imported) and (checkpoint_dir / "latest").exists():
        _require_checkpoints(engine, f"{checkpoint_dir}/latest exists and run.train.resume is on")
        extra = engine.load_checkpoint(checkpoint_dir)
        start_step = int(extra["step"])
        # Where the data stream stood; older checkpoints without it assume this global batch.
        resume_sample = int(extra.get("samples_seen", start_step * ecfg.micro_batch * ecfg.grad_accum * dp))
        resumed_data = extra.get("data")

    data = open_data(
        tcfg.data,
        # Text data without data.tokenizer uses the Hugging Face model's folder (engine/validity.py).
        tokenizer=tcfg.model.hf if tcfg.model.form == "hf" else None,
        vocab_size=model.config.vocab_size if tcfg.model.form == "hf" else tcfg.model.vocab_size,
        seq_len=tcfg.model.seq_len,
        micro_batch=ecfg.micro_batch,
        rank=dp_rank,
        dp_size=dp,
        grad_accum=ecfg.grad_accum,
        resume_step=start_step,
        resume_sample=resume_sample,
        device=engine.device,
        sp_rank=engine.groups.sp_rank,  # an SP group reads the same samples, each rank its slice
        sp_size=engine.groups.sp,
    )

    def global_mean(value: torch.Tensor) -> float:
        if ctx.world_size > 1:
            value = value.clone()
            torch.distributed.all_reduce(value)
            value /= ctx.world_size
        return float(value)

    # Peak memory per rank (engine/peak.py), next to the memory model's figure for this rank.
    predicted, predicted_phase = peak.predicted_peak(_planned_shape(tcfg.model), ecfg, dp=dp, sp=sp,
                                                     device=engine.device,
                                                     allocator=engine.cpu_allocator,
                                                     baseline=peak.host_baseline())

    def rank_peaks() -> list[list[int]]:
        """[rank][PEAK_KEYS] measured now on every rank (a collective: on logged steps only)."""
        mine = torch.tensor(peak.measured(engine.device), dtype=torch.int64, device=engine.device)
        if ctx.world_size == 1:
            return [mine.tolist()]
        every = torch.empty(ctx.world_size * len(peak.PEAK_KEYS), dtype=torch.int64, device=engine.device)
        torch.distributed.all_gather_single(every, mine)
        return every.view(ctx.world_size, -1).tolist()

    # Made once: each step's agreement on a time-limit signal reuses it.
    warned = torch.zeros(1, dtype=torch.int32, device=engine.device)

    def agreed_signal() -> int:
        """The warning signal any rank has received (0: none); the same answer on every rank."""
        if ctx.world_size == 1:
            return _received[0]
        warned.fill_(_received[0])
        torch.distributed.all_reduce(warned, op=torch.distributed.ReduceOp.MAX)
        return int(warned.item())

    def save(step: int) -> None:
        engine.save_checkpoint(
            checkpoint_dir,
            step=step,
            extra={
                "samples_seen": data.samples_seen(step),
                "global_batch": data.global_batch,
                "data": tcfg.data.model_dump(mode="json"),
            },
            keep=tcfg.keep_checkpoints,
        )

    tokens_per_step = data.global_batch * tcfg.model.seq_len
    metrics = None
    if ctx.is_main:
        spec.output_dir.mkdir(parents=True, exist_ok=True)
        metrics = _open_metrics(spec.output_dir / "metrics.jsonl")
        print(
            f"{PROG}: {ctx.world_size} rank(s) (data-parallel {dp}"
            + (f", sequence-parallel {sp}" if sp > 1 else "") + "), backend "
            f"{ctx.backend or 'none'}, device {engine.device}, {model.num_params():,} params, "
            f"zero {ecfg.zero_stage}, {ecfg.precision}, {tokens_per_step:,} tokens/step, "
            f"{tcfg.data.kind} data"
            # initialize() refused a model it could not checkpoint (engine/long/setup.py)
            + (", activation checkpointing" if ecfg.activation_checkpointing is True else "")
            + {"jemalloc": ", malloc: jemalloc", "reuse": ", malloc keeps freed blocks",
               "return": ", malloc returns freed blocks"}.get(engine.cpu_allocator, "")
            + (f", torch.compile of {len(engine.compiled)} blocks (the first step compiles)"
               if engine.compiled else ", eager"),
            file=sys.stderr,
            flush=True,
        )
        if start_step:
            print(f"{PROG}: resumed from {checkpoint_dir} at step {start_step} "
                  f"({resume_sample:,} samples seen)", file=sys.stderr, flush=True)
            if resumed_data is not None and resumed_data != tcfg.data.model_dump(mode="json"):
                print(f"{PROG}: warning: run.train.data differs from the checkpoint's "
                      f"({resumed_data}); continuing at sample {resume_sample:,} of the new data",
                      file=sys.stderr, flush=True)

    first_step = start_step + 1
    first_loss = final_loss = float("nan")
    start = last_time = time.perf_counter()
    last_step = start_step
    end_step = tcfg.steps
    stopped_by = 0  # the time-limit signal that ended the run early (0: it ran to the end)
    try:
        for step in range(first_step, tcfg.steps + 1):
            loss_sum = torch.zeros((), device=engine.device)
            for micro_step in range(ecfg.grad_accum):
                tokens, targets = data.batch(step, micro_step)
                loss = engine(tokens, targets, positions=data.positions)
                loss.backward()
                loss_sum += loss.detach()
            engine.step()
            engine.zero_grad()
            heartbeat(step)  # for dsl's hang watchdog (engine/wire.py); a no-op unless it watches

            # A collective on every step: all ranks stop after the same one. At the last step
            # there is nothing left to resume, so the run just finishes.
            signum = agreed_signal()
            stopping = signum != 0 and step < tcfg.steps
            if stopping:
                _require_checkpoints(engine, f"{_signal_name(signum)} asks for a checkpoint")
            if stopping or tcfg.checkpoint_every is not None and (
                step % tcfg.checkpoint_every == 0 or step == tcfg.steps
            ):
                save(step)
            if stopping:
                stopped_by, end_step = signum, step

            log_now = step % tcfg.log_every == 0 or step == tcfg.steps or stopping
            if not (log_now or step == first_step):
                continue
            # A collective: every rank reaches it on the same steps.
            loss_value = global_mean(loss_sum / ecfg.grad_accum)
            if step == first_step:
                first_loss = loss_value
            if not log_now:
                continue
            final_loss = loss_value
            peaks = rank_peaks()
            now = time.perf_counter()
            interval_s = max(now - last_time, 1e-9)
            tokens_per_s = (step - last_step) * tokens_per_step / interval_s
            eta_s = (tcfg.steps - step) * interval_s / (step - last_step)
            last_time, last_step = now, step
            if metrics is not None:
                worst = _peak_of(peaks, engine.device)
                print(
                    format_progress(step, tcfg.steps, loss_value, engine.lr, tokens_per_s, eta_s)
                    + (f" | peak {worst / 2**30:.2f} GiB > plan {predicted / 2**30:.2f} GiB"
                       if worst > predicted * (1 + peak.PEAK_TOLERANCE) else ""),
                    file=out,
                    flush=True,
                )
                row = {
                    "step": step,
                    "loss": loss_value,
                    "lr": engine.lr,
                    "tokens_per_s": tokens_per_s,
                    "elapsed_s": now - start,
                    "grad_norm": engine.last_grad_norm,
                    # per rank, in rank order (engine/peak.py); device peaks are 0 off CUDA
                    **{key: [r[i] for r in peaks] for i, key in enumerate(peak.PEAK_KEYS)},
                    "predicted_peak_bytes": predicted,
                    "predicted_peak_phase": predicted_phase,
                    "cpu_allocator": engine.cpu_allocator,
                }
                comm_stats = getattr(engine.states, "comm_stats", None)  # 1-bit Adam: bytes sent
                if comm_stats is not None:
                    row.update(comm_stats())
                _write_metrics(metrics, row)
            if stopping:
                break
    finally:
        if metrics is not None:
            _close_metrics(metrics)
    train_s = time.perf_counter() - start
    steps_run = end_step - start_step if end_step > start_step else 0
    summary = {
        "steps": tcfg.steps,
        "start_step": start_step,
        "end_step": end_step,
        "stopped_by": stopped_by,
        "tokens": steps_run * tokens_per_step,
        "tokens_per_s": steps_run * tokens_per_step / train_s,
        "first_loss": first_loss,
        "final_loss": final_loss,
        "train_s": train_s,
        "output_dir": spec.output_dir,
        "world_size": ctx.world_size,
        "peaks": rank_peaks() if steps_run else [],
        "predicted_peak_bytes": predicted,
        "predicted_peak_phase": predicted_phase,
        "device_type": engine.device.type,
    }
    if ctx.is_main:
        if steps_run:
            _print_summary(summary, out)
        if stopped_by:
            print(f"{PROG}: {_signal_name(stopped_by)} received: checkpointed step {end_step} to "
                  f"{checkpoint_dir}; exiting with code {EXIT_CHECKPOINTED} (checkpointed at a "
                  f"time-limit signal): launch again to resume", file=sys.stderr, flush=True)
        elif not steps_run:
            print(f"{PROG}: the checkpoint is at step {start_step} and run.train.steps is "
                  f"{tcfg.steps}: nothing to train", file=sys.stderr, flush=True)
        out.flush()
    dist.teardown(ctx)
    return summary


def _planned_shape(model: Any) -> Any:
    """What the memory model plans for `model`: the bundled Llama's config, or the shape of a
    Hugging Face config.json (engine/modeldesc/shape.py; its path is absolute here)."""
    if model.form == "llama":
        return model
    from dsl.engine.modeldesc.shape import shape_of

    return shape_of(model, Path("/"), lambda name: f"run.train.model.{name}")[0]


def main(argv: list[str] | None = None, *, reexec: bool = False) -> int:
    """The rank's program. `reexec` (the `python -m` entry only: it replaces the process) lets
    the allocator setting re-execute it with jemalloc preloaded (`_preload_allocator`)."""
    parser = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.splitlines()[0])
    parser.add_argument("spec", nargs="?", help="resolved dsl spec (YAML)")
    parser.add_argument("--spec", dest="spec_opt", metavar="SPEC", help="same as positional SPEC")
    args = parser.parse_args(argv)
    spec_path = args.spec_opt or args.spec
    if spec_path is None:
        parser.error("a spec file is required")
    # First, before torch is imported (seconds): a warning that arrives while this rank starts
    # must not end it (SIGUSR1's default action), only make it stop after its first step.
    previous = install_warning_handlers()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, WARNING_SIGNALS)  # blocked across a re-exec (below)
    try:
        spec = load_run_spec(spec_path, *world_of_environment())
        if reexec:
            _preload_allocator(spec.engine.cpu_allocator)
        summary = train(spec)
    except DslError as err:
        if not getattr(err, "echoed", False):  # a failed write is printed by the rank it failed on
            try:
                print(f"{PROG}: error: {err}", file=sys.stderr, flush=True)
            except OSError:  # stderr is a file on the full disk itself: the exit code still says it
                pass
        return err.exit_code
    finally:
        restore_handlers(previous)
    return EXIT_CHECKPOINTED if summary["stopped_by"] else 0


def _preload_allocator(setting: str) -> None:
    """Re-execute this rank with jemalloc preloaded when the setting asks for it (before torch is
    imported; engine/cpu_alloc.py), or print (rank 0) why "auto" could not."""
    from dsl.engine import cpu_alloc

    try:
        note = cpu_alloc.reexec_with_jemalloc(setting, tuple(WARNING_SIGNALS))
    except ValueError as err:
        raise UserError(str(err)) from None
    if note and os.environ.get("RANK", "0") == "0":
        print(f"{PROG}: note: {note}", file=sys.stderr, flush=True)


def exit_now(code: int) -> None:
    """End the rank with `code` after Python's own exit handlers (atexit: logging, offload-file
    finalizers), skipping C++ static destructors: a gloo rank sometimes aborts in one after its
    work is done and its group destroyed (`terminate called without an active exception`,
    SIGABRT; engine/dist.py), and torchrun then reports a finished run as failed."""
    import atexit

    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main(reexec=True))
