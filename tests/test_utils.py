"""The kernel launch helper (msattn.ops.utils.launch): its specialization key, and launches through
it against torch (the interpreter on CPU; the compiled kernels' own launcher on a GPU)."""

import pytest
import torch
import triton
import triton.language as tl

from msattn.ops import utils
from msattn.ops.utils import _specialization, launch
from tests.kernel_cases import DEVICE


# One program: BLOCK elements i of out[i] = alpha * x[i * stride] + y[i] (+ 1 when PLUS_ONE).
@triton.jit
def _axpy_kernel(x_ptr, y_ptr, out_ptr, n, stride, alpha, PLUS_ONE: tl.constexpr,
                 BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    value = alpha * tl.load(x_ptr + i * stride, mask=mask) + tl.load(y_ptr + i, mask=mask)
    if PLUS_ONE:
        value += 1.0
    tl.store(out_ptr + i, value, mask=mask)


CONSTEXPR = (False, False, False, False, False, False, True, True)


def _key(*values):
    return _specialization(values, CONSTEXPR, (4, None, None))


def test_key_is_at_least_as_fine_as_tritons():
    x = torch.zeros(64, dtype=torch.float32)
    base = _key(x, x, x, 64, 2, 0.5, False, 32)
    assert _key(x, x, x, 48, 2, 0.25, False, 32) == base  # n % 16 == 0 both; floats by type
    assert _key(x[1:], x, x, 64, 2, 0.5, False, 32) != base  # 4-byte offset: not 16-aligned
    assert _key(x[4:], x, x, 64, 2, 0.5, False, 32) == base  # 16-byte offset: aligned
    assert _key(x.half(), x, x, 64, 2, 0.5, False, 32) != base  # dtype
    assert _key(x, x, x, 65, 2, 0.5, False, 32) != base  # divisibility by 16
    assert _key(x, x, x, 64, 1, 0.5, False, 32) != base  # == 1 (a constant in Triton)
    assert _key(x, x, x, 64, 2, 0.5, True, 32) != base  # constexprs by value
    assert _key(x, x, x, 64, 2, 0.5, False, 64) != base
    assert _key(x, x, x, 1 << 40, 2, 0.5, False, 32) != base  # int64, not int32
    assert _key(x, x, None, 64, 2, 0.5, False, 32) != base
    assert _specialization((x,) * 3 + (64, 2, 0.5, False, 32), CONSTEXPR, (8, None, None)) != base


def test_launch_matches_torch():
    """Repeated launches with arguments that Triton specializes differently (stride 1 then 2,
    unaligned views, n not a multiple of 16, other constexprs and floats), each against torch,
    outputs poisoned; on a GPU the repeats go through the compiled kernels' launcher."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(600, generator=generator).to(DEVICE)
    y = torch.randn(300, generator=generator).to(DEVICE)
    cases = [(1, 256, 0.5, False), (2, 256, 0.5, False), (1, 256, -3.0, True), (2, 255, 0.5, False),
             (1, 299, 2.0, False), (2, 256, 0.5, False), (1, 256, 0.75, False)]
    for offset in (0, 1, 0):
        for stride, n, alpha, plus_one in cases:
            xs, ys = x[offset:], y[offset:]
            out = torch.full((300,), float("nan"), device=DEVICE)
            launch(_axpy_kernel, (triton.cdiv(n, 128),), xs, ys, out, n, stride, alpha,
                   PLUS_ONE=plus_one, BLOCK=128, num_warps=4)
            expected = alpha * xs[:n * stride:stride] + ys[:n] + float(plus_one)
            torch.testing.assert_close(out[:n], expected, rtol=1e-6, atol=1e-6)
            assert out[n:].isnan().all()  # nothing past n written


@pytest.mark.gpu
def test_gpu_launch_uses_the_compiled_kernels():
    test_launch_matches_torch()
    assert utils._fast_launch[0]
    compiled = utils._launchers[_axpy_kernel].compiled
    # (stride 1 / 2) x (n % 16 == 0 or not) x (PLUS_ONE) x (aligned or not) seen above
    assert 4 <= len(compiled) <= 16
