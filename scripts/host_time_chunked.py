"""Host time of a short chunked-prefill call, stage by stage, on the GPU (no profiler: each
stage is issued CALLS times back to back and timed on the host, then the GPU is synchronised).
A stage whose issue time per call is above its GPU time per call is host-bound.

    python3 scripts/host_time_chunked.py [REQUESTS CHUNK PREFIX ...]   # default 1 1024 16384

Prints, per stage: host microseconds a call (issue), GPU-complete microseconds a call (issue +
sync), and for reference the launch cost of an empty Triton kernel with as many arguments as the
block-attention kernel and of one small torch operation.
"""

import collections
import sys
import time

import torch
import triton
import triton.language as tl

from msattn.backends import triton as backend
from msattn.bench.chunked import ChunkedSettings, _msa, make_inputs
from msattn.config import MSAConfig

CALLS = 50


@triton.jit
def _empty_kernel(a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15, a16, a17,
                  a18, a19, a20, a21, a22, a23, a24, a25, a26, a27, a28, a29,
                  C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, C3: tl.constexpr):
    pass


def timed(fn, calls=CALLS):
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    issued = time.perf_counter()
    torch.cuda.synchronize()
    done = time.perf_counter()
    return (issued - start) / calls * 1e6, (done - start) / calls * 1e6


def launch_host_times(fn, calls=CALLS):
    """Host microseconds a call that each Triton kernel's launch (JITFunction.run) takes in fn."""
    original = triton.runtime.jit.JITFunction.run
    spent = collections.defaultdict(float)

    def run(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            spent[self.fn.__name__] += time.perf_counter() - start

    triton.runtime.jit.JITFunction.run = run
    try:
        fn()
        spent.clear()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    finally:
        triton.runtime.jit.JITFunction.run = original
    total = sum(spent.values()) / calls * 1e6
    print(f"  Triton launches: {total:.1f} us a call: " + ", ".join(
        f"{name} {t / calls * 1e6:.1f}" for name, t in sorted(spent.items(), key=lambda kv: -kv[1])))


def torch_op_times(fn, calls=10):
    """Self host time a call of the torch operations in fn (torch.profiler, CPU only)."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    events.sort(key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events) / calls
    print(f"  torch operations (self host time, profiled): {total:.1f} us a call: " + ", ".join(
        f"{e.key[6:]} x{e.count // calls} {e.self_cpu_time_total / calls:.1f}" for e in events[:12]))


def main(shapes):
    config = MSAConfig()
    settings = ChunkedSettings(op="host", device=torch.device("cuda"), config=config,
                               shapes=tuple(shapes), dtype=torch.bfloat16, backend="triton",
                               warmup=1, repeats=1, time_budget_s=1)
    t = torch.zeros(16, device="cuda", dtype=torch.int32)
    ints = [t] * 4 + list(range(1, 27))
    us = timed(lambda: _empty_kernel[(1,)](*ints, C0=1, C1=2, C2=3, C3=4))
    print(f"empty Triton kernel, 30 arguments: host {us[0]:.1f} us, done {us[1]:.1f} us")
    compiled = _empty_kernel[(1,)](*ints, C0=1, C1=2, C2=3, C3=4)
    try:  # the compiled kernel's own launcher, without the JIT's binding and cache lookup
        runner = compiled[(1, 1, 1)]
        us = timed(lambda: runner(*ints, 1, 2, 3, 4))
        print(f"the same, launched through its CompiledKernel: host {us[0]:.1f} us, done {us[1]:.1f} us")
    except Exception as error:  # noqa: BLE001 (an API difference of this Triton)
        print(f"CompiledKernel launch failed: {error}")
    us = timed(lambda: torch.cumsum(t, 0))
    print(f"torch.cumsum of 16 int32: host {us[0]:.1f} us, done {us[1]:.1f} us")
    for shape in shapes:
        requests, chunk, prefix = shape
        x = make_inputs(settings, shape)
        c = config
        select = lambda: backend.paged_select(  # noqa: E731
            x.qi, x.index_cache, x.block_table, x.cu_seqlens_q, x.seq_lens, topk=c.topk,
            init_blocks=c.init_blocks, local_blocks=c.local_blocks, index_scale=None,
            max_seqlen_q=chunk)
        indices = select()
        attend = lambda: backend.paged_attention(  # noqa: E731
            x.q, x.k_cache, x.v_cache, indices, x.block_table, x.cu_seqlens_q, x.seq_lens,
            softmax_scale=c.head_dim ** -0.5, max_seqlen_q=chunk)
        rows = {"whole call (msa_paged_attention)": lambda: _msa(settings, chunk, x),
                "selection (paged_select)": select,
                "attention (paged_attention: CSR + kernels)": attend,
                "torch.sort of the selection": lambda: indices.flatten().sort(stable=True)}
        print(f"\n{requests} x {chunk} x {prefix}:")
        for name, fn in rows.items():
            host, done = timed(fn)
            print(f"  {name:46s} host {host:7.1f} us   done {done:7.1f} us")
        torch.cuda.set_sync_debug_mode("error")  # a host synchronisation inside the call raises
        try:
            _msa(settings, chunk, x)
            print("  host synchronisations in the call: none")
        except RuntimeError as error:
            print(f"  host synchronisation in the call: {str(error).splitlines()[0]}")
        finally:
            torch.cuda.set_sync_debug_mode("default")
        launch_host_times(lambda: _msa(settings, chunk, x))
        torch_op_times(lambda: _msa(settings, chunk, x))


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:]] or [1, 1024, 16384, 1, 512, 16384, 1, 2048, 65536]
    main([tuple(args[i:i + 3]) for i in range(0, len(args), 3)])
