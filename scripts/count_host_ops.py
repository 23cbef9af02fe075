"""Host work of one chunked-prefill call (``msa_paged_attention`` on the chunked benchmark's
inputs, M3 shape), counted on the CPU: the torch operations it dispatches (with the line of
msattn that issued each) and the Triton launches, with the kernels themselves stubbed out. A
proxy for the host time of short calls, which were bound by it on the GPU.

    python3 scripts/count_host_ops.py REQUESTS CHUNK PREFIX     # e.g. 1 1024 16384
"""

import collections
import os
import sys
import traceback

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from msattn.bench.chunked import ChunkedSettings, _msa, make_inputs  # noqa: E402
from msattn.config import MSAConfig  # noqa: E402


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
    InterpretedFunction.run = lambda self, *args, **kwargs: launches.update([self.fn.__name__])
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


if __name__ == "__main__":
    main(*(int(arg) for arg in sys.argv[1:4]))
