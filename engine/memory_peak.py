"""The step's peak from what is live at each phase, not the sum of every term (torch-free).

engine/memory.py lists what a rank holds, term by term; some of those terms are never live at
the same moment. A training step goes through these phases, and each holds the persistent state
(parameters, gradients, master weights, optimizer states, offload buffers, stage 3's gathered
units, the runtime) plus what the phase itself needs:

    phase            what is live besides the persistent state
    forward          saved activations, autocast weight copies, and the loss's forward part of
                     the logits: the logits and their fp32 log-softmax, 8 of the 12 B per logit
    loss backward    saved activations, weight copies, all the logits buffers (log-softmax output,
                     its gradient, the logits' gradient: 12 B per logit); lm_head's gradient, the
                     first to fill a bucket, comes after they are freed
    layer backward   saved activations, weight copies, one layer rebuilt by checkpointing (the
                     `recomputation peak`: that layer's activations and weight casts, a tiled
                     MLP's tile), the gradient buckets; the logits buffers are freed by then
    optimizer step   the persistent state only (the bundled optimizers update in place, in
                     chunks whose temporaries are small against it)

So with checkpointing the recomputation peak and the logits no longer add up (the long-context
bench saw the sum reject lengths that fit), and without checkpointing the loss's backward is the
peak, as the sum said. Measured against the heap's high-water mark (glibc's in-use bytes sampled
through a step, tests/unit/test_memory_peak_measured.py) the live peak of the bundled model is
within a few percent at stages 0-3.

What a CPU process's resident set adds on top of the live bytes is not a phase: the process
baseline (the `runtime` term, measured: engine/memory_shape.py CPU_RUNTIME_BYTES) and what malloc
keeps of freed memory (the `allocator retention` term, a share of this peak: ALLOCATOR_RETENTION,
by the allocator the rank runs with, engine/cpu_alloc.py). tests/bench/peak.py measures both:
under the default (jemalloc) and with blocks returned to the OS the resident set is within 10% of
the plan; glibc keeping freed blocks ("reuse", "system") carries heap holes that differ between
the ranks of one run, which the model does not count and says so.
"""

from __future__ import annotations

from dataclasses import dataclass

from dsl.engine.memory_shape import (ACTIVATIONS, BUCKETS, LOGITS, MODEL_INIT, OFFLOADED_ACTIVATIONS,
                                     RECOMPUTE, WEIGHT_COPIES, Term)

FORWARD = "forward"
LOSS_BACKWARD = "loss backward"
LAYER_BACKWARD = "layer backward"
OPTIMIZER_STEP = "optimizer step"
PHASES = (FORWARD, LOSS_BACKWARD, LAYER_BACKWARD, OPTIMIZER_STEP)

LOGITS_FORWARD_SHARE = 8 / 12
"""Of the logits term's 12 B per logit, what the forward holds: the logits and their log-softmax."""

# Terms that exist only during part of the step; every other term is persistent.
_STEP_TERMS = {ACTIVATIONS, WEIGHT_COPIES, RECOMPUTE, LOGITS, BUCKETS}
_NOT_ON_DEVICE_IN_STEP = {MODEL_INIT, OFFLOADED_ACTIVATIONS}


def _live_share(phase: str, name: str) -> float:
    """Which share of term `name` is live during `phase` (0 to 1)."""
    if name not in _STEP_TERMS:
        return 1.0
    if phase == OPTIMIZER_STEP:
        return 0.0
    if name == LOGITS:
        return {FORWARD: LOGITS_FORWARD_SHARE, LOSS_BACKWARD: 1.0}.get(phase, 0.0)
    if name == RECOMPUTE:
        return 1.0 if phase == LAYER_BACKWARD else 0.0
    if name == BUCKETS:  # the first staging buffer comes with lm_head's gradient, after the logits'
        return 1.0 if phase == LAYER_BACKWARD else 0.0
    return 1.0  # activations and weight copies: saved in forward, alive until their layer's backward


@dataclass(frozen=True)
class Peak:
    """The largest per-phase total of one location, the phase, and what is live there."""

    bytes: int
    phase: str
    live: tuple[tuple[str, int], ...]
    phases: tuple[tuple[str, int], ...]
    """(phase, bytes) for every phase, in step order."""

    def to_json(self) -> dict:
        return {"bytes": self.bytes, "phase": self.phase, "live": [list(x) for x in self.live],
                "phases": [list(x) for x in self.phases]}


def device_peak(terms: tuple[Term, ...] | list[Term]) -> Peak:
    """The step's device peak over PHASES (transient and host-only terms left out)."""
    steady = [t for t in terms if not t.transient and t.name not in _NOT_ON_DEVICE_IN_STEP]
    totals = []
    for phase in PHASES:
        live = [(t.name, int(t.device_bytes * _live_share(phase, t.name))) for t in steady]
        totals.append((phase, sum(b for _, b in live), tuple((n, b) for n, b in live if b)))
    phase, total, live = max(totals, key=lambda x: x[1])
    return Peak(total, phase, live, tuple((p, b) for p, b, _ in totals))
