"""Eager decode steps at one batch-1 shape, for Nsight Compute (kernels serialised, no PDL overlap):

    ncu --launch-skip 6 --launch-count 3 --metrics gpu__time_duration.sum \
        python3 scripts/ncu_decode_step.py 65536 [bf16|fp8]

runs 3 steps (3 kernels each): the skip leaves the third step's kernels, compiled and warm.
"""

import sys

import torch

import msattn
from msattn.bench import decode, tune

length = int(sys.argv[1])
index_dtype = sys.argv[2] if len(sys.argv) > 2 else "bf16"
settings = tune._decode_settings(length)
cache = decode.make_cache_set(settings, length, 1)
queries = decode.make_queries(settings, 1, 1)
config = tune.CONFIG
wrapper = msattn.MSAPagedWrapper(num_heads=config.num_heads, num_kv_heads=config.num_kv_heads,
                                 head_dim=config.head_dim, index_dim=config.index_dim,
                                 page_size=config.block_size)
wrapper.plan(queries.cu_seqlens_q.cpu(), cache.block_table.shape[1],
             index_dtype=decode.INDEX_DTYPES[index_dtype])
step = tune._decode_step(wrapper, cache, queries, index_dtype)
for _ in range(3):
    step(None)
torch.cuda.synchronize()
