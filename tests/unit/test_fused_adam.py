"""dsl.ops.adam on CPU: the C++ kernel against the plain-torch reference (bit for bit), the
reference against torch.optim.AdamW/Adam, inf/nan skipping, the low-precision copy, the build
cache and the fallback, and the engine's use of it."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch

from dsl.ops import adam as fused
from dsl.ops.adam import adam_step, adam_step_coef, coefficients
from dsl.ops.adam import cpu as cpu_kernel
from dsl.ops.adam.reference import adam_step_reference

# Around the 64-element thread split, the 16-lane vectors, the 64K single-thread limit.
SIZES = [0, 1, 2, 15, 16, 17, 63, 64, 65, 127, 1000, 4099, 65535, 65536, 65537, 131_075]
SCALES = [1.0, 1024.0, 3.0]
"""grad_scale per size (cycled): none, a power of two (exact), and an inexact one."""
LOW = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Bit patterns, so that equality is exact (nan == nan, -0 != +0)."""
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def _state(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(n, generator=gen)
    m = torch.randn(n, generator=gen) * 0.1
    v = torch.rand(n, generator=gen) * 0.01
    return p, m, v


def _run(backend: str, n: int, grad_dtype, low, *, decoupled: bool, grad_scale: float, steps: int = 2):
    p, m, v = _state(n, seed=n)
    lp = None if low is None else torch.empty(n, dtype=low)
    gen = torch.Generator().manual_seed(n + 1)
    for step in range(1, steps + 1):
        g = (torch.randn(n, generator=gen) * 3 * grad_scale).to(grad_dtype)
        skipped = adam_step(p, g, m, v, step=step, lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8,
                            weight_decay=0.1, decoupled=decoupled, grad_scale=grad_scale,
                            param_lp=lp, backend=backend)
        assert skipped is False
    return [t for t in (p, m, v, lp) if t is not None]


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("low", list(LOW))
@pytest.mark.parametrize("decoupled", [True, False], ids=["adamw", "adam"])
def test_cpu_kernel_equals_reference_bit_for_bit(grad_dtype, low: str, decoupled: bool) -> None:
    for i, n in enumerate(SIZES):
        grad_scale = SCALES[i % len(SCALES)]
        ours = _run("cpu", n, grad_dtype, LOW[low], decoupled=decoupled, grad_scale=grad_scale)
        ref = _run("reference", n, grad_dtype, LOW[low], decoupled=decoupled, grad_scale=grad_scale)
        for a, b in zip(ours, ref):
            assert torch.equal(_bits(a), _bits(b)), (n, grad_scale)


@pytest.mark.parametrize(("decoupled", "torch_cls"), [(True, torch.optim.AdamW), (False, torch.optim.Adam)])
@pytest.mark.parametrize("torch_fused", [False, True])
def test_matches_torch_adam_over_20_steps(decoupled: bool, torch_cls, torch_fused: bool) -> None:
    """Tolerance: 1e-6 absolute + 1e-6 relative on the parameters after 20 steps (measured: at
    most 2.4e-7, i.e. 2 fp32 ulp at |p| ~ 1; torch divides by sqrt(bc2) and lerps exp_avg)."""
    n = 50_000
    p0 = torch.randn(n, generator=torch.Generator().manual_seed(0))
    theirs = torch.nn.Parameter(p0.clone())
    opt = torch_cls([theirs], lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, fused=torch_fused)
    mine, m, v = p0.clone(), torch.zeros(n), torch.zeros(n)
    gen = torch.Generator().manual_seed(1)
    for step in range(1, 21):
        g = torch.randn(n, generator=gen) * 1e-2
        theirs.grad = g.clone()
        opt.step()
        adam_step(mine, g, m, v, step=step, lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1,
                  decoupled=decoupled)
    torch.testing.assert_close(mine, theirs.detach(), atol=1e-6, rtol=1e-6)
    state = opt.state[theirs]
    torch.testing.assert_close(m, state["exp_avg"], atol=1e-8, rtol=1e-5)  # ~1 ulp of |m| ~ 1e-2
    torch.testing.assert_close(v, state["exp_avg_sq"], atol=1e-12, rtol=1e-5)


def test_adamw_and_adam_differ_only_through_weight_decay() -> None:
    n = 1000
    results = []
    for decoupled in (True, False):
        for wd in (0.0, 0.1):
            p, m, v = _state(n, seed=3)
            adam_step(p, torch.ones(n), m, v, step=1, lr=1e-2, weight_decay=wd, decoupled=decoupled)
            results.append(p)
    adamw0, adamw, adam0, adam = results
    assert torch.equal(adamw0, adam0)  # no decay: the same algorithm
    assert not torch.equal(adamw, adamw0) and not torch.equal(adam, adam0) and not torch.equal(adamw, adam)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_inf_or_nan_skips_the_step_and_writes_nothing(backend: str, grad_dtype, bad: float) -> None:
    for n, where in ((1, 0), (17, 16), (100_003, 77_777), (100_003, 100_002)):
        p, m, v = _state(n, seed=5)
        lp = torch.full((n,), 7.0, dtype=torch.bfloat16)
        before = [t.clone() for t in (p, m, v, lp)]
        g = torch.randn(n).to(grad_dtype)
        g[where] = bad
        assert adam_step(p, g, m, v, step=4, lr=1e-2, grad_scale=256.0, param_lp=lp, backend=backend) is True
        for a, b in zip((p, m, v, lp), before):
            assert torch.equal(_bits(a), _bits(b))
        # Without the check the kernel writes, and the non-finite value reaches the parameter.
        adam_step(p, g, m, v, step=4, lr=1e-2, param_lp=lp, check_finite=False, backend=backend)
        assert not torch.isfinite(p[where])


def test_finite_extremes_are_not_flagged() -> None:
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        info = torch.finfo(dtype)
        g = torch.tensor([info.max, -info.max, info.tiny, 0.0, -0.0], dtype=dtype)
        assert cpu_kernel.nonfinite_cpu(g) is False
        g[2] = float("nan")
        assert cpu_kernel.nonfinite_cpu(g) is True


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_low_precision_copy_is_the_master_rounded(low) -> None:
    n = 70_001
    p, m, v = _state(n, seed=7)
    lp = torch.empty(n, dtype=low)
    adam_step(p, torch.randn(n, dtype=torch.bfloat16), m, v, step=2, lr=1e-1, param_lp=lp)
    assert torch.equal(_bits(lp), _bits(p.to(low)))


def test_unscaling_by_a_power_of_two_is_exact() -> None:
    n = 10_000
    g = torch.randn(n)
    out = []
    for scale in (1.0, 2.0**12):
        p, m, v = _state(n, seed=9)
        adam_step(p, g * scale, m, v, step=1, lr=1e-2, weight_decay=0.1, grad_scale=scale)
        out.append((p, m, v))
    for a, b in zip(*out):
        assert torch.equal(a, b)


def test_empty_and_single_element_buffers() -> None:
    e = torch.empty(0)
    assert adam_step(e, e.clone(), e.clone(), e.clone(), step=1, lr=1.0) is False
    p, m, v = torch.tensor([1.0]), torch.zeros(1), torch.zeros(1)
    adam_step(p, torch.tensor([0.5]), m, v, step=1, lr=0.1)
    # Step 1 with zero moments: m = 0.1 g, v = 0.001 g^2, p -= lr * sign(g) (eps aside).
    assert p.item() == pytest.approx(0.9, abs=1e-6)
    assert m.item() == pytest.approx(0.05) and v.item() == pytest.approx(0.00025)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"param": torch.zeros(4, dtype=torch.float64)}, "param must be float32"),
        ({"grad": torch.zeros(4, dtype=torch.int32)}, "grad must be one of"),
        ({"exp_avg": torch.zeros(5)}, "exp_avg has 5 elements, param has 4"),
        ({"param_lp": torch.zeros(4)}, "param_lp must be bfloat16 or float16"),
        ({"grad": torch.zeros(8)[::2]}, "grad must be contiguous"),
    ],
)
def test_bad_buffers_are_refused_with_the_reason(change: dict, message: str) -> None:
    args = {"param": torch.zeros(4), "grad": torch.zeros(4), "exp_avg": torch.zeros(4), "exp_avg_sq": torch.zeros(4)}
    args.update(change)
    for backend in ("cpu", "reference"):
        with pytest.raises(ValueError, match=message):
            adam_step(**args, step=1, lr=0.1, backend=backend)
    with pytest.raises(ValueError, match="step counts from 1"):
        adam_step(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), step=0, lr=0.1)


def test_build_is_cached_for_the_next_process(tmp_path) -> None:
    env = {**os.environ, "DSL_CACHE_DIR": str(tmp_path)}
    code = "from dsl.ops.adam import cpu; print(cpu.load()._name)"
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    lib = first.stdout.strip()
    assert lib.startswith(str(tmp_path)) and lib.endswith(".so")
    built = os.stat(lib).st_mtime_ns
    second = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0 and second.stdout.strip() == lib
    assert os.stat(lib).st_mtime_ns == built  # loaded, not rebuilt


def test_failed_build_warns_once_and_runs_the_reference(monkeypatch, caplog) -> None:
    def broken() -> None:
        raise cpu_kernel.BuildError("building the fused CPU Adam kernel in /x failed: g++: not found")

    monkeypatch.setattr(cpu_kernel, "load", broken)
    monkeypatch.setattr(fused, "_cpu_state", {})
    n = 1000
    p, m, v = _state(n, seed=11)
    rp, rm, rv = (t.clone() for t in (p, m, v))
    g = torch.randn(n)
    coef = coefficients(step=1, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled=True)
    with caplog.at_level(logging.WARNING, logger="dsl.ops.adam"):
        for _ in range(2):
            adam_step(p, g, m, v, step=1, lr=1e-2)
            adam_step_reference(rp, g, rm, rv, coef)
    assert [r.getMessage() for r in caplog.records] == [
        "fused CPU Adam unavailable, using the (slower, same-result) reference: "
        "building the fused CPU Adam kernel in /x failed: g++: not found"]
    assert all(torch.equal(a, b) for a, b in zip((p, m, v), (rp, rm, rv)))


def test_engine_adamw_update_runs_the_fused_kernel() -> None:
    """engine.optim.update on fp32 pieces equals dsl's reference bit for bit (not torch's)."""
    from dsl.engine.optim import Hyper, update

    hyper = Hyper("adamw", betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    sizes, decay = [300, 70_000, 5], [True, False, True]
    params = [torch.randn(n) for n in sizes]
    states = {"exp_avg": [torch.zeros(n) for n in sizes], "exp_avg_sq": [torch.zeros(n) for n in sizes]}
    ref = [(p.clone(), torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    for step in (1, 2, 3):
        grads = [torch.randn(n) for n in sizes]
        update(hyper, params, grads, states, decay, step=step, lr=1e-2)
        for (p, m, v), g, d in zip(ref, grads, decay):
            coef = coefficients(step=step, lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8,
                                weight_decay=0.1 if d else 0.0, decoupled=True)
            adam_step_coef(p, g, m, v, coef, backend="reference")
    for (p, m, v), mine, em, ev in zip(ref, params, states["exp_avg"], states["exp_avg_sq"]):
        assert torch.equal(p, mine) and torch.equal(m, em) and torch.equal(v, ev)
