"""Host work of one chunked-prefill call (``msa_paged_attention`` on the chunked benchmark's
inputs, M3 shape), counted on the CPU: the torch operations it dispatches (with the line of
msattn that issued each) and the Triton launches, with the kernels themselves stubbed out; then
the host time of a call without its launches (median of 7 x 200 calls). A proxy for the host
time of short calls, which were bound by it on the GPU.

    python3 scripts/count_host_ops.py REQUESTS CHUNK PREFIX     # e.g. 1 1024 16384
"""

import collections
import os
import statistics
import sys
import time
import traceback

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from msattn.bench.chunked import ChunkedSettings, _msa, make_inputs  # noqa: E402
from msattn.config import MSAConfig  # noqa: E402
from msattn.ops import indexer  # noqa: E402

indexer.device_sm_count = lambda device: 132  # an H100's: the selection plan the GPU gets


class CountOps(TorchDispatchMode):
    """Counts (operation, issuing line of msattn) pairs."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        ours = [f for f in traceback.extract_stack() if f"{os.sep}msattn{os.sep}" in f.filename]
        where = f"{os.path.basename(ours[-1].filename)}:{ours[-1].lineno}" if ours else "?"
        self.ops[(str(func), where)] += 1
        return func(*args, **(kwargs or {}))


def main(requests: int, chunk: int, prefix: int) -> None:
    launches = collections.Counter()
    # a launch does nothing but count (neither the interpreter's nor the JIT's launch path runs)
    InterpretedFunction.__getitem__ = \
        lambda self, grid: lambda *args, **kwargs: launches.update([self.fn.__name__])
    settings = ChunkedSettings(op="count", device=torch.device("cpu"), config=MSAConfig(),
                               shapes=((requests, chunk, prefix),), dtype=torch.bfloat16,
                               backend="triton", warmup=0, repeats=1, time_budget_s=0)
    inputs = make_inputs(settings, (requests, chunk, prefix))
    with CountOps() as counter:
        _msa(settings, chunk, inputs)
    print(f"{requests} x {chunk} x {prefix}: {sum(counter.ops.values())} torch operations, "
          f"{sum(launches.values())} Triton launches {dict(launches)}")
    for (op, where), count in counter.ops.most_common():
        print(f"{count:4d} {op:40s} {where}")
    for _ in range(50):
        _msa(settings, chunk, inputs)
    rounds = []
    for _ in range(7):
        start = time.perf_counter()
        for _ in range(200):
            _msa(settings, chunk, inputs)
        rounds.append((time.perf_counter() - start) / 200 * 1e6)
    print(f"host time of a call without its launches: median {statistics.median(rounds):.1f} us, "
          f"min {min(rounds):.1f} us")


if __name__ == "__main__":
    main(*(int(arg) for arg in sys.argv[1:4]))
