"""dsl.ops.adam's Triton kernels against the plain-torch reference.

Without a GPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set before the
module is imported; the interpreter's cost is per program, hence large blocks). The GPU tests
at the end run only where CUDA is available."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import pytest
import torch

# Not importorskip: importing triton here, before TRITON_INTERPRET is set, would make the
# fixture re-import triton's Python modules.
if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed (pip install -e '.[test]')", allow_module_level=True)
if not torch.cuda.is_available():
    # Set at collection, before anything in this pytest process imports triton (torch._dynamo
    # does): without a GPU the interpreter is the only way triton kernels run at all.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dsl.ops.adam import coefficients  # noqa: E402
from dsl.ops.adam.reference import adam_step_reference  # noqa: E402

# Not multiples of any block used here, apart from the powers of two.
SIZES = [1, 2, 3, 7, 16, 31, 100, 255, 256, 1000, 1023, 1024, 1025, 4097, 10_000, 65_535, 65_536, 65_537,
         100_003, 131_072, 200_001, 262_147]
BLOCK = 65536


NAME = "dsl.ops.adam.triton_adam"


def _interpreted_triton_loaded() -> bool:
    """triton is imported and its library functions were decorated for the interpreter."""
    standard = sys.modules.get("triton.language.standard")
    if standard is None:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(standard.max, InterpretedFunction)


def _python_triton_modules() -> dict:
    """triton's Python modules (and ours) in sys.modules; not its C extension, which can be
    initialised only once per process."""
    return {k: v for k, v in sys.modules.items()
            if k == NAME or ((k == "triton" or k.startswith("triton.")) and not k.startswith("triton._C"))}


@pytest.fixture(scope="module")
def tri():
    """dsl.ops.adam.triton_adam and triton itself imported under the interpreter.

    TRITON_INTERPRET is read when a function is decorated, triton's own library functions
    (tl.max, ...) included. It is set when this file is collected; if triton was imported before
    that without it, triton's Python modules are imported afresh here and the earlier ones are put
    back afterwards (nanobind then reports leaks at exit: harmless). With a GPU
    the compiled kernels are tested instead (one process cannot hold both)."""
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the GPU tests below cover the kernels")
    if _interpreted_triton_loaded():  # the usual case: TRITON_INTERPRET was set at collection
        saved = {}
        if NAME in sys.modules and not sys.modules[NAME].INTERPRETED:
            del sys.modules[NAME]
    else:
        saved = _python_triton_modules()
        for k in saved:
            del sys.modules[k]
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        mod = importlib.import_module(NAME)
        assert mod.INTERPRETED
        yield mod
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old
        if saved:
            for k in _python_triton_modules():
                del sys.modules[k]
            sys.modules.update(saved)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def _inputs(n: int, grad_dtype, grad_scale: float, seed: int, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(n, generator=gen)
    m = torch.randn(n, generator=gen) * 0.1
    v = torch.rand(n, generator=gen) * 0.01
    g = (torch.randn(n, generator=gen) * 3 * grad_scale).to(grad_dtype)
    return [t.to(device) for t in (p, g, m, v)]


def _both(tri, n, grad_dtype, grad_scale, low, decoupled, *, inject=None, block=BLOCK, device="cpu"):
    coef = coefficients(step=3, lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1,
                        decoupled=decoupled, grad_scale=grad_scale)
    out = []
    for run in ("triton", "reference"):
        p, g, m, v = _inputs(n, grad_dtype, grad_scale, seed=n, device=device)
        if inject is not None:
            g[inject] = float("inf")
        lp = None if low is None else torch.full((n,), 3.0, dtype=low, device=device)
        if run == "triton":
            skipped = tri.adam_step_triton(p, g, m, v, coef, param_lp=lp, block=block)
        else:
            skipped = adam_step_reference(p.cpu(), g.cpu(), m.cpu(), v.cpu(), coef,
                                          param_lp=None if lp is None else lp.cpu())
            p, m, v, lp = (None if t is None else t.cpu() for t in (p, m, v, lp))
        out.append((skipped, [t.cpu() for t in (p, m, v, lp) if t is not None]))
    return out


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("grad_scale", [1.0, 512.0])
def test_interpreted_kernel_equals_reference_on_22_sizes(tri, grad_dtype, grad_scale: float) -> None:
    for i, n in enumerate(SIZES):
        low = (None, torch.bfloat16, torch.float16)[i % 3]
        decoupled = i % 2 == 0
        (s_tri, ours), (s_ref, ref) = _both(tri, n, grad_dtype, grad_scale, low, decoupled)
        assert s_tri is s_ref is False
        for a, b in zip(ours, ref):
            assert torch.equal(_bits(a), _bits(b)), (n, low, decoupled)


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_interpreted_kernel_skips_on_inf_and_writes_nothing(tri, grad_dtype) -> None:
    for n, where in ((1, 0), (1025, 1024), (200_001, 131_073)):
        (s_tri, ours), (s_ref, ref) = _both(tri, n, grad_dtype, 256.0, torch.bfloat16, True, inject=where)
        assert s_tri is s_ref is True
        p, g, m, v = _inputs(n, grad_dtype, 256.0, seed=n)
        untouched = [p, m, v, torch.full((n,), 3.0, dtype=torch.bfloat16)]
        for a, b in zip(ours, untouched):
            assert torch.equal(_bits(a), _bits(b))


def test_interpreted_small_blocks_cover_many_programs(tri) -> None:
    """Block 1024 over sizes that leave a partial last block: masks and program offsets."""
    for n in (1023, 3001, 5 * 1024 + 1):
        (_, ours), (_, ref) = _both(tri, n, torch.bfloat16, 1.0, torch.bfloat16, False, block=1024)
        for a, b in zip(ours, ref):
            assert torch.equal(_bits(a), _bits(b)), n


def test_interpreted_nonfinite_flag(tri) -> None:
    g = torch.zeros(70_000, dtype=torch.bfloat16)
    assert int(tri.nonfinite_triton(g)[0]) == 0
    g[69_999] = float("nan")
    assert int(tri.nonfinite_triton(g)[0]) == 1
    assert int(tri.nonfinite_triton(torch.empty(0))[0]) == 0


def _compiled_module():
    """triton_adam decorated for the GPU (not the interpreter)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set for the whole run")
    mod = importlib.import_module(NAME)
    assert not mod.INTERPRETED
    return mod


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("low", [None, torch.bfloat16, torch.float16])
def test_gpu_kernel_matches_reference(grad_dtype, low) -> None:
    real = _compiled_module()
    for n in (1, 1000, 1025, 1 << 20, (1 << 20) + 3):
        (s_tri, ours), (s_ref, ref) = _both(real, n, grad_dtype, 512.0, low, n % 2 == 0, block=1024, device="cuda")
        assert s_tri is s_ref is False
        # fp fusion is off and div/sqrt are rounded correctly: expect equality; allow 1 ulp.
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a.float(), b.float(), atol=0, rtol=2**-22 if a.dtype == torch.float32 else 2**-7)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_auto_backend_is_triton_and_skips_on_inf() -> None:
    from dsl.ops.adam import adam_step

    _compiled_module()

    p, g, m, v = (torch.ones(4097, device="cuda") for _ in range(4))
    g[4096] = float("nan")
    before = p.clone()
    assert adam_step(p, g, m, v, step=1, lr=0.1) is True
    assert torch.equal(p, before)
    g[4096] = 1.0
    assert adam_step(p, g, m, v, step=1, lr=0.1) is False
    assert not torch.equal(p, before)


def test_interpreted_kernel_through_adam_step(tri) -> None:
    """The public entry point with backend="triton" runs these kernels (the choice on CUDA)."""
    from dsl.ops.adam import adam_step

    out = []
    for backend in ("triton", "reference"):
        p, g, m, v = _inputs(5000, torch.float16, 64.0, seed=1)
        lp = torch.empty(5000, dtype=torch.bfloat16)
        assert adam_step(p, g, m, v, step=7, lr=3e-3, weight_decay=0.05, decoupled=False, grad_scale=64.0,
                         param_lp=lp, backend=backend) is False
        out.append((p, m, v, lp))
    for a, b in zip(*out):
        assert torch.equal(_bits(a), _bits(b))
