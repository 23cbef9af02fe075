"""Small helpers shared by the Triton kernels and launchers."""

from __future__ import annotations

import functools
import os
import re

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # scores are scaled by this to run the softmax in exp2
LN2 = tl.constexpr(0.6931471805599453)


def tensor_atomics_reach_every_thread() -> bool:
    """Whether the old values of a tensor atomic reach every thread that holds an element: Triton
    3.5 and newer. Before, a thread holding a replicated copy of an element (a tensor smaller
    than the program's threads) got 0 (triton-lang/triton#7402)."""
    version = re.match(r"(\d+)\.(\d+)", triton.__version__)
    return version is not None and (int(version[1]), int(version[2])) >= (3, 5)


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for host code, as ``triton.cdiv`` (which is a constexpr function: each call
    from Python costs about 3 µs, a dozen a chunked-prefill call)."""
    return (a + b - 1) // b


def next_power_of_2(n: int) -> int:
    """The least power of two at least ``n`` (0 for 0), as ``triton.next_power_of_2``, for host
    code (see :func:`cdiv`)."""
    return 1 << (n - 1).bit_length() if n > 0 else 0


def _device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(index))


def _capability_major(index: int) -> int:
    return _capability(index)[0]


@functools.lru_cache(maxsize=None)
def _pdl_supported(index: int) -> bool:
    if _capability_major(index) < 9:
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
        from triton.language.extra import cuda as triton_cuda
    except ImportError:
        return False
    return "launch_pdl" in CUDAOptions.__dataclass_fields__ and hasattr(triton_cuda, "gdc_wait")


def interpreted() -> bool:
    """Whether Triton kernels run in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def programmatic_launch(device: torch.device) -> bool:
    """Whether kernels on ``device`` can use programmatic dependent launch (Hopper or newer, and a
    Triton with ``launch_pdl`` and the grid-dependency intrinsics): a dependent kernel launched
    with ``launch_pdl=True`` starts while the kernel before it drains, and waits in
    ``gdc_wait()`` before it reads what that kernel wrote."""
    if device.type != "cuda" or interpreted():
        return False
    return _pdl_supported(_device_index(device))


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def device_sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA device; a nominal 4 for the CPU interpreter."""
    if device.type != "cuda":
        return 4
    return _sm_count(_device_index(device))


def dot_options(dtype: torch.dtype) -> dict:
    """Constexpr arguments of :func:`mma` for operands of ``dtype``.

    float32 operands use exact IEEE products (not TF32). Triton's CPU interpreter (3.9) computes
    bf16 ``tl.dot`` wrongly, so there the operands are upcast to float32 (bf16 products are exact
    in float32, so the result is the same).
    """
    return {"DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32",
            "DOT_UPCAST": interpreted() and dtype == torch.bfloat16}


@triton.jit
def mma(a, b, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr):
    """``a @ b`` with float32 accumulation on the tensor cores."""
    if DOT_UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=DOT_PRECISION)


def sm90_reductions(device: torch.device) -> bool:
    """Whether kernels may use TMA bulk float32 reductions (``desc.atomic_add`` on a
    ``TensorDescriptor``: ``cp.reduce.async.bulk.tensor``): sm_90 or newer; never under the CPU
    interpreter, which has no descriptor reductions."""
    if device.type != "cuda" or interpreted():
        return False
    return _capability_major(_device_index(device)) >= 9


def fp8_conversions(device: torch.device) -> bool:
    """Whether kernels on ``device`` may use PTX's fp8 conversions (``cvt.rn.f16x2.e4m3x2``):
    an NVIDIA GPU of sm_89 or newer, never the CPU interpreter."""
    if device.type != "cuda" or interpreted() or torch.version.hip is not None:
        return False
    return _capability(_device_index(device)) >= (8, 9)


@triton.jit
def arrive_last(counter_ptr, expected):
    """Count this program in at the int32 ``counter_ptr``: True for the last of ``expected``
    programs, which also resets the counter to 0 for the next launch. The barrier and the atomic's
    release make every thread's earlier stores visible to the last program (the atomic acquires);
    that program reads them at L2 (``cache_modifier=".cg"``)."""
    tl.debug_barrier()
    arrived = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    last = arrived == expected - 1
    if last:
        tl.store(counter_ptr, 0)
    return last


@triton.jit
def gdc_wait():
    """Wait for the kernel this one was launched after (programmatic dependent launch)."""
    tl.extra.cuda.gdc_wait()


@triton.jit
def gdc_launch_dependents():
    """Let the kernel launched after this one (with ``launch_pdl``) start."""
    tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def finish_softmax(acc, row_max, row_sum):
    """Normalise an exp2-domain softmax accumulation: ``acc [R, D]`` (sum of p * v), ``row_max``
    and ``row_sum [R]`` (base-2 max and sum of ``p``). Returns ``(out [R, D], lse [R])`` with the
    natural-log LSE; rows that saw no key get 0 and ``-inf``."""
    has_keys = row_sum > 0
    safe_sum = tl.where(has_keys, row_sum, 1.0)
    out = acc / safe_sum[:, None]
    lse = tl.where(has_keys, (row_max + tl.log2(safe_sum)) * LN2, float("-inf"))
    return out, lse


@triton.jit
def block_visible(block, position, BLOCK_SIZE: tl.constexpr):
    """Whether a selected key block (an id; -1 pads) holds a key at or before ``position``: the
    rule of the selection CSR, the merges and the decode. In int64, so no id wraps."""
    return (block >= 0) & (block.to(tl.int64) * BLOCK_SIZE <= position)


@triton.jit
def rows_to_fp16(q, other_abs_max=None):
    """Rows of ``q [R, Di]`` in fp16, each scaled by a power of two ``2^shift [R]`` (returned)
    that brings its largest value (or ``other_abs_max [R]``, when larger: the rest of the row
    elsewhere) to about 2^13 (rows below 2^-113 by 2^126 only): finite in fp16 whatever the
    magnitude, exact for every value within 2^27 of the largest."""
    q32 = q.to(tl.float32)
    row_abs_max = tl.max(tl.abs(q32), axis=1)
    if other_abs_max is not None:
        row_abs_max = tl.maximum(row_abs_max, other_abs_max)
    shift = tl.minimum(13.0 - tl.floor(tl.log2(row_abs_max)), 126.0)  # 2^shift finite in fp32
    factor = tl.exp2(tl.where(row_abs_max > 0, shift, 0.0))
    return (q32 * factor[:, None]).to(tl.float16), factor
