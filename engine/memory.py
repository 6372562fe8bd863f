"""Bytes per rank of a training configuration, term by term (torch-free: plain arithmetic).

The planner (`dsl plan`, `dsl launch` with `auto` fields) and the engine (to report what it
expects next to what it measures) use this one module. Every term is per rank (one device) and
says where the bytes live: `device_bytes` on the accelerator, `host_bytes` in host RAM (pinned
buffers included), `nvme_bytes` on local NVMe. On a CPU-only host the "device" is host RAM too.

    estimate(model, engine, dp=8, sp=1, micro_batch=2) -> Breakdown   # every term
    model_states(params, stage=2, shards=8, precision="bf16")         # parameters .. optimizer
    expected_state_summary(model, engine, dp, micro_batch)            # keys of Engine.state_summary

Symbols below: P parameters, N ZeRO shards (= dp x sp: sequence-parallel ranks hold replicas
of the same weights, so ZeRO shards over the whole world, as DeepSpeed-Ulysses does), b micro
batch, s sequence length, h hidden, f ffn size, a query heads, k kv heads, V vocabulary, L layers.

Model states (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion
Parameter Models", sec. 3.1 and 5): mixed-precision Adam holds 2P (16-bit params) + 2P (16-bit
grads) + KP (K = 12: fp32 master, momentum, variance). Stage 1 shards the K term, stage 2 also
the gradients, stage 3 also the parameters:

    stage 0: (2 + 2 + K) P          stage 1: (2 + 2) P + K P / N
    stage 2: 2 P + (2 + K) P / N    stage 3: (2 + 2 + K) P / N

The paper's example (P = 7.5e9, N = 64) gives 120 / 31.4 / 16.6 / 1.9 GB (tested). Per-parameter
bytes by precision (`state_bytes`):

    precision                  param  grad  master  optimizer (adamw / sgd)  stage-3 working copy
    fp32                         4      4     0       8 / 4                   0
    bf16|fp16, "paper"           2      2     4       8 / 4                   0     ZeRO paper, DeepSpeed
    bf16|fp16, "autocast"        4      4     0       8 / 4                   2     engine: precision_layout autocast
    bf16|fp16, "master", st 0-2  2      4     4       8 / 4                   -     engine: precision_layout master
    low_precision_states         2      2     0       4 / 2                   0     bf16 params and moments, no master

(`Layout` in engine/memory_shape.py; None is the engine's default, master.) The engine's "autocast" keeps fp32 parameters, which are
the master weights, under autocast; at stages 0-2 autocast's 16-bit weight copies are saved for
backward (2 B per matmul parameter, `autocast weight copies`). Its "master" keeps 16-bit
parameters at stages 0-2 (no weight copies), fp32 gradients (full at stages 0-1; at stage 1
plus the reduced shard; the partition at stage 2) and the fp32 master weights partitioned like
the optimizer states: stage 2 holds 2 P + 16 P / N, below DeepSpeed's 2 P + 18 P / N. At stage
3 both engine layouts are one: a fp32 parameter shard (the master) plus a 16-bit working copy of
it (+2 B/param / N in `parameters`), which is what it gathers, so its matmuls find their weights
in 16 bits and save no copies.

Offload (Ren et al. 2021, "ZeRO-Offload"; Rajbhandari et al. 2021, "ZeRO-Infinity"), as the
engine does it (engine/offload.py): the optimizer keeps its own master copy of the rank's shard
(fp32; bf16 with low_precision_states) and the moments in host RAM (`cpu`) or in files (`nvme`),
and runs the step there. With the whole update offloaded (`ratio` 1, engine/core.py
host_states) the device keeps only what the model computes with: the stage's master partition
(the master layout's, stage 3's fp32 shard) is in host memory (for `cpu` it is the optimizer's
master itself; for `nvme` it receives each updated sub-group), and at stages 2-3 so is the reduced
gradient partition. Gradients stream through sub-group buffers of `offload.sub_group_mib` (two
on a GPU with pinned memory, so one copy runs while the other sub-group is updated; one on a CPU
device; none for `cpu` at stages 2-3, which reads the host partition in place), plus for nvme 3
buffers of [master + moments] per sub-group (read-ahead, update, write-behind). Parameter offload
(stage 3, `offload.params: cpu`) keeps the parameter partitions in host memory between uses;
`nvme` keeps what a gather reads (the 16-bit working copy, fp32 without mixed precision) in a
file, read per unit at every gather and rewritten after every update (engine/memory_nvme.py has
the bytes moved per step), while the fp32 master stays with the optimizer.

Activations (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models", sec. 4.1): a GPT layer with 16-bit activations keeps s b h (34 + 5 a s / h) bytes; the
5 a s^2 b part is the attention scores, softmax and dropout. `memory_reference.korthikanti_layer_bytes` gives that
reference. dsl's model is Llama-style (no dropout, RMSNorm, SwiGLU, GQA), so `_layer_saved`
lists what autograd actually saves per layer for it, tensor by tensor, with c the compute
element size and r the residual/norm element size (r = 4 under the engine's autocast, whose
residual stream and RMSNorm stay fp32; r = c otherwise):

    attention: norm input r bsh, rstd 4 bs, norm output r bsh, [autocast: 3 input casts c bsh],
               q c bsh, k and v 2 c bsh k/a, flash output c bsh + logsumexp 4 b a s
               (math attention instead: softmax probabilities c b a s^2), o_proj input c bsh
    mlp:       norm input r bsh, rstd 4 bs, norm output r bsh, [autocast: 2 input casts c bsh],
               gate, up, silu(gate), product: 4 c bsf (x experts per token for MoE)

Flash attention never materialises the s^2 scores (it saves the output and the logsumexp and
recomputes scores in backward): this is the difference between the two attention lines.
Sequence parallelism (Ulysses) divides every term by sp (each rank holds s/sp tokens, or all s
tokens of a/sp heads inside attention), with two exceptions: the attention output and o_proj's
input are separate tensors (the head -> seq all-to-all sits between them: + c bsh / sp), and with
fewer kv heads than sp each rank holds one replicated kv head (k -> max(k, sp) above).
Activation checkpointing keeps each layer's input
(r b s h) and recomputes one layer at a time in backward: L r bsh saved, plus one full layer
while it is rebuilt (the `recomputation peak` term).
Under autocast every matmul also saves the 16-bit copy of its weight for backward: c x (matmul
parameters), at stages 0-2; checkpointing keeps only lm_head's (a recomputed layer's come back in
the recomputation peak). At stage 3 there are none: the matmuls save the gathered 16-bit
parameters themselves, which are parameter storage (the `gathered parameters` term).

Logits: the fp32 log-softmax output of the loss (saved), its gradient and the gradient of the
logits coexist in backward: 12 b s V / sp bytes.

Long-sequence switches (engine/long/, `long_context(engine)` reads them from the config):
- tiled loss (chunk t_l tokens): no log-softmax output is saved (- 4 b s V / sp) and no 16-bit
  copy of lm_head's weight or input (the fp32 final-norm output is saved instead); the logits
  term is one chunk, 12 min(t_l, bs/sp) V;
- tiled MLP (chunk t_m tokens): an MLP saves only its input (the fp32 norm output, r bsh), not
  gate, up, silu, product (4 c bsf) nor, under autocast, its input casts and weight copies; one
  tile's 4 c t_m f is rebuilt in backward (added to the recomputation peak);
- activation offload (with checkpointing): the L layer inputs (r bsh each) and RoPE tables that
  checkpointing keeps move to host memory (`offloaded activations`, host bytes).

Buffers: stages 2-3 reduce-scatter gradients through 2 staging buffers in flight, each a bucket of
`bucket_mib` (or the largest parameter, the embedding, when larger; at most the whole gradient);
stages 0-1 reduce inside their full gradient buffer, so no extra; stage 3 holds the gathered parameters of the
largest unit it gathers (a decoder layer, or the embedding/head) twice (current + prefetched;
2 B/param under bf16/fp16, the working copy's dtype) plus that unit's unsharded gradient. A CUDA
rank also holds ~1 GiB of CUDA context, NCCL and cuBLAS workspaces (`runtime`); a CPU rank its
measured process baseline (Python, torch, gloo, without the libraries' file-backed pages:
162 MiB, 239 MiB with activation checkpointing, which imports torch._dynamo), plus what its
malloc keeps beyond the live bytes (`allocator retention`: 15% of the live peak under jemalloc,
the default; engine/memory_shape.py).

Model construction: at stages 0-2 the trainer builds the full model in fp32 on the host before
the engine moves it, so each rank needs 4P bytes of host RAM for a moment (`transient`). Stage 3
is assumed to build it unit by unit, sharded as it goes (DeepSpeed's zero_init, FSDP2's
meta-device init), so the transient is one unit.

Comparison with DeepSpeed's estimators (`memory_reference.deepspeed_estimate`, reimplemented from
deepspeed/runtime/zero/stage_1_and_2.py and stage3.py, DeepSpeed 0.19): they cover model states
only (no activations, logits or buffers), count full 16-bit gradients plus a 16/N fp32 partition
at stage 1-2 on the GPU (4P + 16P/N, vs. the paper's 2P + 14P/N at stage 2), and multiply every
CPU figure by additional_buffer_factor = 1.5, a fudge factor for allocator and pinned-buffer
overheads; without zero_init their CPU figure also charges 4 bytes x P per GPU for every process
loading the fp32 model, which dsl reports as the transient `model construction` term instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dsl.engine.config import EngineConfig
    from dsl.engine.train_config import ModelConfig
    from dsl.topology.model import ProcessBaseline

from dsl.engine.memory_shape import (  # noqa: F401 - re-exported: engine.memory is the public name
    ACTIVATIONS, BUCKETS, CPU_RUNTIME_BYTES, GATHERED, GB, GPU_RUNTIME_BYTES,
    GRADIENTS, GiB, LOGITS, Layout, MASTER, MODEL_INIT, MiB, ModelShape, NVME_SWAP_BUFFERS,
    OFFLOADED_ACTIVATIONS, OFFLOAD_BUFFERS, OPTIMIZER, PARAMETERS, RECOMPUTE, RUNTIME, StateBytes,
    Term, WEIGHT_COPIES, _ceil_div, state_bytes, ALLOCATOR, ALLOCATOR_RETENTION, cpu_runtime_bytes, cpu_runtime_formula,
    gpu_runtime_bytes, gpu_runtime_formula,
    GLIBC_EXCESS, planned_allocator,
)

from dsl.engine.memory_acts import (  # noqa: E402,F401 - re-exported: engine.memory is the public name
    _layer_saved, activations, layer_activation_bytes, logits, offloaded_activations,
)
from dsl.engine.memory_peak import Peak, device_peak  # noqa: E402

ONEBIT_BLOCK = 256
"""Elements per scale of the 1-bit compression (ops/comm/allreduce.py DEFAULT_BLOCK)."""


def onebit_buffer_bytes(params: int, world: int, block: int = ONEBIT_BLOCK) -> tuple[int, str]:
    """1-bit Adam's buffers after its freeze step (engine/onebit.py, ops/comm/allreduce.py), fp32
    over the padded flat parameters: the frozen denominator sqrt(v_hat)+eps (4 B), the worker
    error (4 B; the momentum is allocated padded, so no padded copy), the server error of this
    rank's chunk (4/w B), and
    the wire buffers of packed signs + block scales (send, receive, gathered: w rows each; own
    chunk: 1 row): (3w+1)/w x (1/8 + 4/block) B per parameter."""
    w = max(1, world)
    padded = -(-params // (w * block)) * (w * block)
    wire = (3 * w + 1) * (padded // w) * (1 / 8 + 4 / block)
    total = int(4 * params + 4 * padded + 4 * padded // w + wire)
    return total, f"1-bit buffers ({8 + 4 / w + (3 * w + 1) / w * (1 / 8 + 4 / block):.2f} B x {params:,})"


def model_states(params: int, *, stage: int, shards: int, precision: str = "bf16",
                 low_precision_states: bool = False, optimizer: str = "adamw",
                 offload_optimizer: str = "none", offload_params: str = "none",
                 layout: Layout | None = None, sub_group_mib: float = 256.0, accelerator: bool = True,
                 pin_memory: bool = True, offload_ratio: float = 1.0) -> tuple[Term, ...]:
    """Parameters, gradients, master weights, optimizer states (and offload buffers), per rank."""
    sb = state_bytes(precision, low_precision_states, optimizer, layout, stage)
    n = max(1, shards)

    def part(per_param: int, sharded: bool) -> tuple[int, str]:
        if sharded and n > 1:
            return _ceil_div(per_param * params, n), f"{per_param} B x {params:,} / {n}"
        return per_param * params, f"{per_param} B x {params:,}"

    # CPU optimizer offload (engine/zero/base.py host_states): a master partition kept apart from
    # what the model computes with lives in host memory, where it is the optimizer's own master
    # (one copy): the master layout's at stages 0-2, stage 3's fp32 shard behind its 16-bit
    # working copy. At stages 2-3 the reduced gradient partition lives there too.
    partial = offload_optimizer == "cpu" and offload_ratio < 1.0
    cpu = offload_optimizer == "cpu" and not partial
    # CPU or NVMe offload of the whole update (engine/core.py host_states): the stage's own master
    # partition and (stages 2-3) its gradient partition live in host memory.
    host_states = cpu or offload_optimizer == "nvme"
    host_master = host_states and (sb.weights16 or (stage >= 3 and (bool(sb.work) or offload_params != "none")))
    p_bytes, p_f = part(sb.param, stage >= 3)
    if stage >= 3 and host_master:  # the fp32 shard is the optimizer's master, on the host
        p_bytes, p_f = 0, "fp32 shard: with the offloaded optimizer (master weights)"
    if stage >= 3 and sb.work:  # the engine's 16-bit working copy of its shard (engine/zero/stage3.py)
        w_bytes, w_f = part(sb.work, True)
        p_bytes, p_f = p_bytes + w_bytes, (f"{p_f} + working copy {w_f}" if p_bytes else f"working copy {w_f}")
    g_bytes, g_f = part(sb.grad, stage >= 2)
    paper = precision != "fp32" and not low_precision_states and layout == "paper"
    if stage == 1 and n > 1 and not paper:
        # The bundled engine keeps the full gradient buckets and reduce-scatters them into a
        # separate partition buffer at stage 1 (engine/zero/stage1.py).
        shard, shard_f = part(sb.grad, True)
        g_bytes, g_f = g_bytes + shard, f"{g_f} + shard {shard_f}"
    terms = []
    if offload_params == "nvme":  # engine/zero/param_files.py: what a gather reads, in a file
        gather_elem = sb.work or sb.param
        f_bytes, f_f = part(gather_elem, True)
        chunk = min(_ceil_div(params, n), max(1, int(sub_group_mib * MiB) // 4)) * gather_elem
        terms.append(Term(PARAMETERS, host_bytes=chunk, nvme_bytes=f_bytes,
                          formula=f"{f_f} in a file (offloaded to nvme) + a {gather_elem} B x "
                                  f"{chunk // gather_elem:,} write buffer in host memory"
                                  + (" + a host read buffer of the largest unit" if accelerator else "")))
    elif offload_params == "cpu":
        terms.append(Term(PARAMETERS, host_bytes=p_bytes, formula=p_f + " (offloaded to host)"))
    else:
        terms.append(Term(PARAMETERS, device_bytes=p_bytes, formula=p_f))
    if host_states and stage >= 2:
        terms.append(Term(GRADIENTS, host_bytes=g_bytes, formula=g_f + " in host memory (reduced partitions "
                                                                       "copied down as each bucket completes)"))
    else:
        terms.append(Term(GRADIENTS, device_bytes=g_bytes, formula=g_f))
    if partial:  # engine/offload.py SplitStates: `ratio` of the shard on the host, the rest on the device
        return tuple(terms) + _partial_offload_terms(params, sb, stage, n, offload_ratio, sub_group_mib,
                                                     accelerator and pin_memory, part)
    if offload_optimizer == "none":
        m_bytes, m_f = part(sb.master, stage >= 1)
        o_bytes, o_f = part(sb.optimizer, stage >= 1)
        if not sb.master:
            m_f = "none: the parameters are the fp32 master weights"
        if optimizer == "onebit_adam":
            extra, extra_f = onebit_buffer_bytes(params, n)
            o_bytes, o_f = o_bytes + extra, f"{o_f} + {extra_f}"
        terms.append(Term(MASTER, device_bytes=m_bytes, formula=m_f))
        terms.append(Term(OPTIMIZER, device_bytes=o_bytes, formula=o_f))
        return tuple(terms)
    # Offload (engine/offload.py): the optimizer keeps its own master copy of the shard (fp32, or
    # bf16 with low_precision_states) next to the states, in host RAM (cpu) or files (nvme), and
    # streams the device's gradient shard through sub-groups of `sub_group_mib`.
    elem = sb.master or sb.param
    moments = sb.optimizer // elem
    shard_numel = _ceil_div(params, n) if stage >= 1 else params
    sub = min(shard_numel, max(1, int(sub_group_mib * MiB) // elem))
    m_bytes, m_f = part(elem, stage >= 1)
    o_bytes, o_f = part(sb.optimizer, stage >= 1)
    where = "host_bytes" if offload_optimizer == "cpu" else "nvme_bytes"
    dropped = offload_optimizer == "nvme" and stage >= 3 and (bool(sb.work) or offload_params == "nvme")
    if dropped:
        # Stage 3 under NVMe offload: the optimizer's files are the only master (zero/stage3.py
        # drop_master; each updated sub-group is cast straight into the working copy).
        terms.append(Term(MASTER, nvme_bytes=m_bytes, formula=f"{m_f} in the offload's files only"))
    elif host_master and not cpu:
        # NVMe: the stage's fp32 master partition waits in host memory (the offload uploads each
        # updated sub-group into it, the stage casts it into the 16-bit parameters), next to the
        # offload's own master copy in the files: zero/master.py, zero/stage3.py.
        h_bytes, h_f = part(sb.master or sb.param, stage >= 1)
        terms.append(Term(MASTER, host_bytes=h_bytes, nvme_bytes=m_bytes,
                          formula=f"{h_f} in host memory + {m_f} in the offload's files"))
    elif host_master:
        terms.append(Term(MASTER, host_bytes=m_bytes, formula=f"{m_f} in host memory, shared by the stage and "
                                                               "the CPU optimizer"))
    else:
        terms.append(Term(MASTER, **{where: m_bytes}, formula=f"{m_f} (offloaded to {offload_optimizer})"))
    terms.append(Term(OPTIMIZER, **{where: o_bytes}, formula=f"{o_f} (offloaded to {offload_optimizer})"))
    # Gradient sub-groups come down through 2 pinned buffers on a GPU (one copy in flight while
    # the other is updated), through 1 on a CPU device (engine/offload.py grad_buffers); none
    # where the gradient partition is in host memory already (CPU offload, stages 2-3).
    grads_n = 0 if cpu and stage >= 2 else 2 if accelerator and pin_memory else 1
    grad_f = (f"{grads_n} gradient sub-group buffer{'s' if grads_n > 1 else ''} x {elem} B x {sub:,}" if grads_n
              else "no gradient buffer: the optimizer reads the host gradient partition in place")
    if offload_optimizer == "cpu":
        terms.append(Term(OFFLOAD_BUFFERS, host_bytes=grads_n * elem * sub, formula=grad_f))
    else:
        terms.append(Term(OFFLOAD_BUFFERS, host_bytes=(NVME_SWAP_BUFFERS * (1 + moments) + grads_n) * elem * sub,
                          formula=f"{NVME_SWAP_BUFFERS} swap buffers x [master + {moments} states] x {elem} B x "
                                  f"{sub:,} + {grad_f}"))
    return tuple(terms)


def _partial_offload_terms(params: int, sb: StateBytes, stage: int, n: int, ratio: float, sub_group_mib: float,
                           pinned: bool, part) -> tuple[Term, ...]:
    """Master, optimizer and buffer terms under `offload.ratio` < 1 (engine/offload.py SplitStates):
    the stage keeps its usual device state (its master, its gradient partition); the CPU
    optimizer holds an fp32 master copy and the moments of the first `ratio` of the shard."""
    elem = sb.master or sb.param
    shard_numel = _ceil_div(params, n) if stage >= 1 else params
    host_numel = int(shard_numel * ratio)
    moments = sb.optimizer // elem
    d_master, d_f = part(sb.master, stage >= 1)
    sub = min(host_numel, max(1, int(sub_group_mib * MiB) // elem))
    grads_n = 2 if pinned else 1
    return (
        Term(MASTER, device_bytes=d_master, host_bytes=elem * host_numel,
             formula=f"{d_f} on the device + {elem} B x {host_numel:,} ({ratio:g} of the shard) on the host"),
        Term(OPTIMIZER, device_bytes=sb.optimizer * (shard_numel - host_numel), host_bytes=sb.optimizer * host_numel,
             formula=f"{sb.optimizer} B x {shard_numel - host_numel:,} on the device + {sb.optimizer} B x "
                     f"{host_numel:,} on the host ({moments} moments)"),
        Term(OFFLOAD_BUFFERS, host_bytes=grads_n * elem * sub,
             formula=f"{grads_n} gradient sub-group buffer{'s' if grads_n > 1 else ''} x {elem} B x {sub:,}"),
    )


# Activations: engine/memory_acts.py (re-exported above) ------------------------------------


def long_context(engine: "EngineConfig") -> dict[str, Any]:
    """The memory-relevant long-context switches of an engine config, as `breakdown` keywords."""
    return {"tiled_loss_tokens": engine.tiled_loss.chunk_tokens if engine.tiled_loss.enabled else None,
            "tiled_mlp_tokens": engine.tiled_mlp.chunk_tokens if engine.tiled_mlp.enabled else None,
            "activation_offload": engine.activation_offload}


# Whole configuration ------------------------------------------------------------------------


@dataclass(frozen=True)
class Breakdown:
    """Every term of one configuration, per rank."""

    terms: tuple[Term, ...]
    params: int
    shards: int
    stage: int
    micro_batch: int
    sp: int

    @property
    def device_bytes(self) -> int:
        """The rank's device bytes at the step's peak phase (engine/memory_peak.py): terms that
        are never live together (the logits and a recomputed layer) are not added."""
        return self.peak.bytes

    @property
    def device_sum_bytes(self) -> int:
        """Every steady term added up, as if all were live at once (an upper bound)."""
        return sum(t.device_bytes for t in self.terms if not t.transient)

    @cached_property
    def peak(self) -> Peak:
        """The step's peak by phase (computed once: the planner reads device_bytes often)."""
        return device_peak(self.terms)

    @property
    def host_bytes(self) -> int:
        """Steady host RAM of the rank."""
        return sum(t.host_bytes for t in self.terms if not t.transient)

    @property
    def host_peak_bytes(self) -> int:
        """Host RAM at its worst moment: training, or building the model before it moves."""
        transient = sum(t.host_bytes for t in self.terms if t.transient)
        return max(self.host_bytes, transient)

    @property
    def nvme_bytes(self) -> int:
        return sum(t.nvme_bytes for t in self.terms)

    def term(self, name: str) -> Term:
        for t in self.terms:
            if t.name == name:
                return t
        return Term(name)

    def to_json(self) -> dict[str, Any]:
        return {"params": self.params, "shards": self.shards, "device_bytes": self.device_bytes,
                "device_sum_bytes": self.device_sum_bytes, "peak": self.peak.to_json(),
                "host_bytes": self.host_bytes, "host_peak_bytes": self.host_peak_bytes,
                "nvme_bytes": self.nvme_bytes, "terms": [t.to_json() for t in self.terms]}


def _fixed(engine: "EngineConfig", name: str, value: Any) -> Any:
    if value == "auto":
        raise ValueError(f"engine.{name} is auto; the planner fills it (dsl plan) before memory can be estimated")
    return value


def estimate(model: "ModelConfig | ModelShape | str", engine: "EngineConfig", *, dp: int, sp: int | None = None,
             micro_batch: int | None = None, seq_len: int | None = None, flash_attention: bool = True,
             accelerator: bool = True, layout: Layout | None = None, fold_host: bool = True,
             allocator: str | None = None, baseline: ProcessBaseline | None = None) -> Breakdown:
    """Every memory term of one rank training `model` with `engine` on dp x sp ranks.

    `accelerator=False` plans CPU ranks: the device is host RAM (no offload buffers apply, no
    CUDA runtime); their runtime term is `baseline` (the host's measured ProcessBaseline,
    topology/baseline.py) when given. `engine` fields must be concrete (not `auto`).
    """
    return breakdown(
        ModelShape.of(model),
        stage=_fixed(engine, "zero_stage", engine.zero_stage),
        dp=dp,
        sp=_fixed(engine, "sequence_parallel", engine.sequence_parallel) if sp is None else sp,
        micro_batch=micro_batch or engine.micro_batch,
        precision=engine.precision,
        low_precision_states=engine.low_precision_states,
        optimizer=engine.optimizer.type,
        offload_optimizer=_fixed(engine, "offload.optimizer", engine.offload.optimizer),
        offload_params=engine.offload.params,
        checkpointing=bool(_fixed(engine, "activation_checkpointing", engine.activation_checkpointing)),
        bucket_mib=engine.bucket_mib,
        sub_group_mib=engine.offload.sub_group_mib, pin_memory=engine.offload.pin_memory,
        offload_ratio=engine.offload.ratio,
        seq_len=seq_len, flash_attention=flash_attention, accelerator=accelerator,
        layout=layout if layout is not None else engine.precision_layout, fold_host=fold_host,
        allocator=allocator or planned_allocator(engine.cpu_allocator), baseline=baseline, **long_context(engine))


def breakdown(shape: ModelShape, *, stage: int, dp: int, sp: int = 1, micro_batch: int, precision: str = "bf16",
              low_precision_states: bool = False, optimizer: str = "adamw", offload_optimizer: str = "none",
              offload_params: str = "none", checkpointing: bool = False, bucket_mib: float = 25.0,
              sub_group_mib: float = 256.0, seq_len: int | None = None, flash_attention: bool = True,
              accelerator: bool = True, layout: Layout | None = None, tiled_loss_tokens: int | None = None,
              pin_memory: bool = True, fold_host: bool = True, offload_ratio: float = 1.0,
              tiled_mlp_tokens: int | None = None, activation_offload: bool = False,
              allocator: str = "jemalloc", baseline: ProcessBaseline | None = None) -> Breakdown:
    """`estimate` with plain values instead of an EngineConfig (the planner's inner loop).
    `fold_host` (CPU ranks, accelerator=False): report host bytes as the rank's device bytes."""
    mb = micro_batch
    sb = state_bytes(precision, low_precision_states, optimizer, layout, stage)
    shards = dp * sp
    terms = list(model_states(shape.params, stage=stage, shards=shards, precision=precision,
                              low_precision_states=low_precision_states,
                              optimizer=optimizer, offload_optimizer=offload_optimizer,
                              offload_params=offload_params, layout=layout,
                              sub_group_mib=sub_group_mib, accelerator=accelerator,
                              pin_memory=pin_memory, offload_ratio=offload_ratio))
    offload_acts = activation_offload and checkpointing  # offload moves checkpoints; none without
    acts, copies, recompute = activations(shape, micro_batch=mb, seq_len=seq_len, sp=sp,
                                          checkpointing=checkpointing, flash_attention=flash_attention,
                                          sb=sb, stage=stage, tiled_loss_tokens=tiled_loss_tokens,
                                          tiled_mlp_tokens=tiled_mlp_tokens, activation_offload=offload_acts,
                                          accelerator=accelerator)
    terms += [acts, copies, recompute,
              logits(shape, micro_batch=mb, seq_len=seq_len, sp=sp, chunk_tokens=tiled_loss_tokens, sb=sb,
                     stage=stage)]
    if getattr(shape, "model_states_only", False):  # engine/modeldesc/shape.py: counts, no dimensions
        unknown = ("unknown: the model is given by its counts only; give layers, hidden, heads, vocab and "
                   "seq_len for these")
        terms[-4:] = [Term(t.name, formula=unknown) for t in terms[-4:]]
    if offload_acts:
        terms.append(offloaded_activations(shape, micro_batch=mb, seq_len=seq_len, sp=sp, sb=sb))
    # Stages 2-3 reduce-scatter through staging buffers of one bucket each (a parameter larger
    # than a bucket gets one of its own: the embedding), never more than the whole gradient;
    # stages 0-1 reduce inside their full gradient buffer (the gradients term).
    bucket = int(bucket_mib * MiB)
    staging = min(max(bucket, shape.vocab * shape.hidden * sb.grad), shape.params * sb.grad)
    if stage >= 2 and shards > 1:
        terms.append(Term(BUCKETS, device_bytes=2 * staging,
                          formula=f"2 reduce-scatter staging buffers in flight x {staging / MiB:,.1f} MiB "
                                  f"(a {bucket_mib:g} MiB bucket, the largest parameter, or the whole gradient)"))
    else:
        terms.append(Term(BUCKETS, formula="none: stages 0-1 reduce inside the full gradient buffer"
                          if shards > 1 else "none: one rank, nothing to reduce"))
    if stage >= 3:
        unit = shape.largest_unit_params
        gather = sb.work or sb.param  # the engine gathers its 16-bit working copy under bf16/fp16
        terms.append(Term(GATHERED, device_bytes=2 * gather * unit + sb.grad * unit,
                          formula=f"2 x {gather} B x {unit:,} (largest unit, current + prefetched) "
                                  f"+ its {sb.grad} B gradient"))
    runtime = gpu_runtime_bytes(baseline) if accelerator else cpu_runtime_bytes(checkpointing, baseline)
    terms.append(Term(RUNTIME, device_bytes=runtime,
                      formula=gpu_runtime_formula(baseline) if accelerator else
                      cpu_runtime_formula(checkpointing, baseline)))
    if accelerator and stage < 3:
        terms.append(Term(MODEL_INIT, host_bytes=4 * shape.params, transient=True,
                          formula=f"4 B x {shape.params:,}: the fp32 model built on the host before it moves"))
    elif accelerator:
        unit = shape.largest_unit_params
        terms.append(Term(MODEL_INIT, host_bytes=4 * unit, transient=True,
                          formula=f"4 B x {unit:,}: stage 3 builds the model unit by unit, sharded (zero_init)"))
    else:
        # On CPU the model is built where it trains; only what sharding later frees is extra.
        steady_params = terms[0].device_bytes
        terms.append(Term(MODEL_INIT, device_bytes=0, host_bytes=max(0, 4 * shape.params - steady_params),
                          transient=True, formula="the full fp32 model before stage 3 shards it"))
    if not accelerator and fold_host:
        # Device and host are the same RAM: report everything as device bytes of the rank.
        terms = [Term(t.name, t.device_bytes + (0 if t.transient else t.host_bytes), t.host_bytes if t.transient else 0,
                      t.nvme_bytes, t.formula, t.transient) for t in terms]
    if not accelerator:
        terms.append(allocator_term(terms, allocator, runtime))
    return Breakdown(tuple(terms), shape.params, shards, stage, mb, sp)


def allocator_term(terms: list[Term], allocator: str, runtime: int) -> Term:
    """What a CPU rank's malloc keeps beyond the live bytes (ALLOCATOR_RETENTION of the step's
    live peak, the runtime excluded), or a zero term that says why it is not counted."""
    share = ALLOCATOR_RETENTION.get(allocator)
    if share is None:
        return Term(ALLOCATOR, formula=f"not counted: {allocator} (glibc keeping freed blocks) leaves heap holes "
                                       f"that differ between runs and ranks, measured {GLIBC_EXCESS} above the "
                                       "plan (engine/cpu_alloc.py)")
    live = device_peak(terms).bytes - runtime
    return Term(ALLOCATOR, device_bytes=int(share * live),
                formula=f"{share:.0%} of the live peak {live / MiB:,.0f} MiB: {allocator}'s size classes and "
                        "kept extents (measured, tests/bench/peak.py)" if share else
                        f"none: {allocator} returns freed blocks to the OS")


def expected_state_summary(model: "ModelConfig | ModelShape | str", engine: "EngineConfig", *, dp: int,
                           micro_batch: int | None = None, sp: int = 1, accelerator: bool = False,
                           flash_attention: bool = True) -> dict[str, int]:
    """What `Engine.state_summary()` should report on one rank after a step, by the same keys.

    params/grads/optimizer_states/activations are device-side (with offload optimizer_states_bytes
    holds only the master layout's device master, stages 0-2; offload_cpu_bytes /
    offload_nvme_bytes hold the offloaded master copy, moments and buffers); activations_bytes is what autograd saves during one forward (activations +
    autocast weight copies + the fp32 log-softmax output of the loss, 4 B per logit, which a tiled
    loss does not keep; offloaded activation checkpoints are not in it); total_bytes
    the sum of the first four, as the engine defines it.
    """
    b = estimate(model, engine, dp=dp, sp=sp, micro_batch=micro_batch, accelerator=accelerator,
                 flash_attention=flash_attention, fold_host=False)
    shape = ModelShape.of(model)
    tokens = (micro_batch or engine.micro_batch) * shape.seq_len // sp
    t = b.term
    host = sum(x.host_bytes for x in b.terms
               if not x.transient and x.name in (PARAMETERS, GRADIENTS, MASTER, OPTIMIZER, OFFLOAD_BUFFERS))
    nvme = sum(x.nvme_bytes for x in b.terms)
    out = {
        "params_bytes": t(PARAMETERS).device_bytes,
        "grads_bytes": t(GRADIENTS).device_bytes,
        # With offload the moments and the offload's master are off the device; the master
        # layout's own device master (stages 0-2) stays.
        "optimizer_states_bytes": t(MASTER).device_bytes + t(OPTIMIZER).device_bytes,
        "activations_bytes": t(ACTIVATIONS).device_bytes + t(WEIGHT_COPIES).device_bytes
        + (0 if engine.tiled_loss.enabled else 4 * tokens * shape.vocab),
    }
    out["total_bytes"] = sum(out.values())
    out["offload_cpu_bytes"] = host
    out["offload_nvme_bytes"] = nvme
    return out
