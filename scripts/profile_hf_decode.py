"""Where one decode step of transformers' MiniMax-M3 goes, "sdpa" against "msattn" (CUDA):

    python3 scripts/profile_hf_decode.py [PROMPT_LENGTH] [LAYERS]

The M3-shaped model of ``msattn bench hf`` (random weights, tiny MLPs) prefills a random prompt
with a DynamicCache, then runs single-token forward steps. Per implementation it prints the
median wall time of a step (host included, CUDA-synchronised), the GPU time of the step's
kernels, the number of host synchronisations a step makes (``torch.cuda`` sync debug mode), and
the profiler's ops by self CPU time.
"""

import statistics
import sys
import time
import warnings

import torch

import msattn.integrations.transformers as msattn_tf
from msattn.bench import cli, hf

length = int(sys.argv[1]) if len(sys.argv) > 1 else 16384
layers = int(sys.argv[2]) if len(sys.argv) > 2 else 4
suite = cli.SUITES["hf"]
settings = hf.HFSettings(
    op="hf", device=torch.device("cuda"), config=suite.config, lengths=(length,), gen_lengths=(),
    new_tokens=8, hidden_size=suite.hidden_size, num_layers=layers, vocab_size=suite.vocab_size,
    mlp_size=suite.mlp_size, dtype=torch.bfloat16, backend="triton", warmup=1, repeats=1,
    time_budget_s=1.0)
msattn_tf.register(backend="triton")
model = hf.build_model(settings)
ids = torch.randint(3, settings.vocab_size, (1, length), device="cuda")
token = torch.randint(3, settings.vocab_size, (1, 1), device="cuda")

for impl in ("sdpa", "msattn"):
    model.set_attn_implementation(impl)
    with torch.inference_mode():
        cache = model(input_ids=ids, use_cache=True, logits_to_keep=1).past_key_values

        def step():
            return model(input_ids=token, past_key_values=cache, use_cache=True).logits

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        walls = []
        for _ in range(20):
            start = time.perf_counter()
            step()
            torch.cuda.synchronize()
            walls.append((time.perf_counter() - start) * 1e3)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            step()
            torch.cuda.set_sync_debug_mode("default")
            torch.cuda.synchronize()
        syncs = [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
    events = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in events) / 3
    print(f"\n=== {impl}: prompt {length}, {layers} layers: step wall {statistics.median(walls):.3f} ms "
          f"(median of 20), GPU kernels {gpu_us / 1e3:.3f} ms, host syncs per step {len(syncs)}")
    for where in dict.fromkeys(syncs):
        print(f"  sync x{syncs.count(where)}: {where}")
    print(events.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60))
    del cache
    torch.cuda.empty_cache()
