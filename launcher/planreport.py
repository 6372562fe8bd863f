"""`dsl plan`'s report: the choice and why, candidates, a bar per memory term, the commands."""

from __future__ import annotations

from typing import Any

from dsl.engine import memory
from dsl.launcher.hardware import fmt_gb
from dsl.launcher.planner import SAFETY_MARGIN, Plan

BAR_WIDTH = 40
MAX_ROWS = 16


def _bars(terms: list[tuple[str, int, str]], capacity: float) -> list[str]:
    """One line per non-zero term: name, bytes, a bar scaled to `capacity`, the formula."""
    lines = []
    for name, n, formula in terms:
        if not n:
            if formula.startswith("not counted"):  # a term the model leaves out says so (engine/memory.py)
                lines.append(f"  {name:<30} {'?':>10}  {'':<{BAR_WIDTH + 1}} [dim]{formula}[/dim]")
            continue
        width = max(1, round(BAR_WIDTH * n / capacity)) if capacity else 1
        bar = "█" * min(width, BAR_WIDTH) + ("▶" if width > BAR_WIDTH else "")
        lines.append(f"  {name:<30} {fmt_gb(n):>10}  [cyan]{bar:<{BAR_WIDTH + 1}}[/cyan] [dim]{formula}[/dim]")
    return lines


def reference_lines(plan: Plan, c: Any) -> list[str]:
    """One line per published estimator for the chosen candidate (engine/memory_reference.py):
    DeepSpeed's (next to dsl's own model states), the ZeRO paper's split, accelerate's."""
    from rich.markup import escape

    hw = plan.hardware
    refs = plan.references(c)
    names = (memory.PARAMETERS, memory.GRADIENTS, memory.MASTER, memory.OPTIMIZER, memory.OFFLOAD_BUFFERS)
    states = sum(c.breakdown.term(n).device_bytes for n in names)
    host = hw.ranks_per_host * sum(c.breakdown.term(n).host_bytes for n in names)
    where = "GPU" if hw.accelerator else "rank"
    lines = ["\nreferences (model states only):"]
    ds = plan.deepspeed_comparison() if hw.accelerator else None
    if ds is not None:
        flags = refs["deepspeed"]["flags"]
        shown = ", ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in flags.items()
                          if k in ("cpu_offload", "cpu_offload_params", "zero_init"))
        lines.append(f"  DeepSpeed {ds['function']} ({shown}): {fmt_gb(ds['gpu_bytes'])} per GPU, "
                     f"{fmt_gb(ds['cpu_bytes'])} CPU per node; dsl's model states: {fmt_gb(states)} per {where}"
                     + (f", {fmt_gb(host)} host RAM per node" if host else "")
                     + f". [dim]{escape(ds['why_different'])}[/dim]")
    elif c.zero_stage == 0:
        lines.append("  DeepSpeed: no estimator for ZeRO stage 0")
    paper = refs["zero_paper"]
    lines.append(f"  ZeRO paper {paper['formula']} (K={paper['k']}, N_d={paper['n_d']}): "
                 f"{fmt_gb(paper['device_bytes'])} per device")
    acc = refs["accelerate"]
    lines.append(f"  accelerate estimate-memory ({acc['dtype']}): total {fmt_gb(acc['total_bytes'])}, largest layer "
                 f"{fmt_gb(acc['largest_layer_bytes'])}, training with Adam {fmt_gb(acc['training_adam_bytes'])} "
                 "(one device, no sharding)")
    return lines


def peak_line(b: Any) -> str:
    """Where the step peaks and what is live there (engine/memory_peak.py), when terms are left out."""
    peak = b.peak
    if peak.bytes == b.device_sum_bytes:
        return f"  peak at {peak.phase}: every term above is live at once"
    live = dict(peak.live)
    left = [t.name for t in b.terms if not t.transient and t.device_bytes and t.name not in live]
    return (f"  peak at {peak.phase}: {fmt_gb(peak.bytes)}, the sum less what is not live then "
            f"({', '.join(left)}; sum {fmt_gb(b.device_sum_bytes)})")


def render(plan: Plan, name: str, commands: str | None, console: Any) -> None:
    """`dsl plan`'s report, printed with rich (markup) on `console`."""
    from rich.markup import escape

    hw, shape = plan.hardware, plan.shape
    p = console.print
    count = f"{shape.params / 1e9:.2f} B" if shape.params >= 1e9 else f"{shape.params:,}"
    if getattr(shape, "model_states_only", False):  # engine/modeldesc/shape.py: counts without dimensions
        dims = "dimensions unknown: the plan covers model states only"
    else:
        dims = (f"{shape.layers} layers, hidden {shape.hidden}, {shape.heads} heads / {shape.kv_heads} kv, "
                f"ffn {shape.ffn}, vocab {shape.vocab:,}")
    family = getattr(shape, "family", None)
    label = {None: "", "counts": ", given by their count"}.get(family, f" ({family})")
    p(f"[bold]{escape(name)}[/bold]: {count} parameters{label} ({dims}), "
      f"seq_len {shape.seq_len}, train_batch {plan.target_batch} ({plan.target_batch * shape.seq_len:,} tokens/step)")
    p(f"hardware: {escape(hw.describe())} [dim]({escape(hw.topology.source)})[/dim]")
    p("fixed by the spec: " + (", ".join(f"{k} {str(v).lower() if isinstance(v, bool) else v}"
                                         for k, v in plan.fixed.items()) or "nothing"))
    c = plan.choice
    if c is None:
        p("\n[bold red]nothing fits.[/bold red]")
        closest = min(plan.candidates, key=lambda x: x.device_bytes, default=None)
        if closest is not None:
            p(f"closest: {closest.label()}: {escape(closest.why_not or '')}")
        p("what would fit:")
        for s in plan.suggestions:
            p(f"  • {escape(s)}")
    else:
        p(f"\n[bold green]choice[/bold green]: [bold]{c.label()}[/bold]")
        if c.unsupported:
            launch = plan.launch_choice
            then = f"dsl launch would use {launch.label()} instead" if launch else "dsl launch would refuse this job"
            p(f"  [yellow]this version of the engine cannot run it yet ({escape(c.unsupported)}); {then}[/yellow]")
        p("why:")
        for r in plan.reasons:
            p(f"  • {escape(r)}")
        usable = hw.device_memory_bytes * (1 - SAFETY_MARGIN)
        where = "device" if hw.accelerator else "CPU rank"
        p(f"\nmemory per {where}: {fmt_gb(c.device_bytes)} of {fmt_gb(usable)} usable")
        for line in _bars([(t.name, t.device_bytes, t.formula) for t in c.breakdown.terms if not t.transient],
                          usable):
            p(line)
        p(escape(peak_line(c.breakdown)))
        if hw.accelerator:
            host_usable = hw.host_ram_bytes * (1 - SAFETY_MARGIN)
            per_rank = [(t.name + (" (transient)" if t.transient else ""), hw.ranks_per_host * t.host_bytes,
                         f"x {hw.ranks_per_host} rank(s): {t.formula}") for t in c.breakdown.terms if t.host_bytes]
            p(f"host RAM per host: {fmt_gb(c.host_bytes)} at the largest moment, of {fmt_gb(host_usable)} usable")
            for line in _bars(per_rank, host_usable):
                p(line)
            if c.nvme_bytes:
                p(f"NVMe per host: {fmt_gb(c.nvme_bytes)} of {fmt_gb(hw.nvme_free_bytes)} free")
        for line in reference_lines(plan, c):
            p(line)
    # A plain fixed-width table (rich's Table costs more time than the whole plan).
    header = ("stage", "offload", "sp", "ckpt", "micro x accum", "device", "host", "step", "bound by", "fits")
    rows = []
    for cand in plan.candidates[:MAX_ROWS]:
        fits = "yes" if cand.fits else f"no: {cand.why_not or ''}"
        if cand.fits and cand.unsupported:
            fits += " (engine: not yet)"
        rows.append((str(cand.zero_stage), cand.offload + {"none": "", "cpu": "+params"}.get(cand.offload_params, f"+params {cand.offload_params}"),
                     str(cand.sp), "yes" if cand.activation_checkpointing else "no",
                     f"{cand.micro_batch} x {cand.grad_accum}", fmt_gb(cand.device_bytes), fmt_gb(cand.host_bytes),
                     f"{cand.step.total_s:.2f} s", cand.step.dominant, fits, cand is c))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    right = {0, 2, 4, 5, 6, 7}

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(cell.rjust(w) if i in right else cell.ljust(w)
                         for i, (cell, w) in enumerate(zip(cells, widths))) + "  " + cells[-1]

    p("\n[bold]candidates[/bold] (fitting first, fastest first)")
    p(f"[bold]{escape(line(header))}[/bold]")
    for row in rows:
        text = escape(line(row[:-1]))
        p(f"[bold]{text}[/bold]" if row[-1] else text, soft_wrap=True)
    if len(plan.candidates) > MAX_ROWS:
        p(f"[dim]... and {len(plan.candidates) - MAX_ROWS} more (dsl plan --json lists all)[/dim]")
    if plan.notes:
        p("\nassumptions:")
        for n in plan.notes:
            p(f"  • {escape(n)}")
    if commands:
        p("\n[bold]commands[/bold] (what dsl launch runs; dsl launch --dry-run):")
        p(escape(commands), soft_wrap=True)
