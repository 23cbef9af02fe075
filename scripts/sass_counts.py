"""Compile a decode kernel for sm_90 on a machine without a GPU and count its SASS instructions,
its registers and its shared memory. Needs a Triton with its NVIDIA backend (``pip install
triton==3.6.0`` in a side venv works); how the 4-bit decode was sized, and why fp8 K/V do not
reach their byte floor (benchmarks/README.md, 2026-12-07 and 12-08).

    python3 scripts/sass_counts.py [scores|attention|block] [NAME=VALUE ...]   # constexprs, num_warps
    python3 scripts/sass_counts.py scores KEY_FORMAT=1 BLOCK_N=64
    python3 scripts/sass_counts.py scores PTX_DECODE=False   # the 4-bit integer decode
    python3 scripts/sass_counts.py attention KV_FP8=True     # fp8 K/V caches

``scores``: the selection's score kernel (``indexer._block_scores_kernel``; KEY_FORMAT 0 bf16
keys, 1 fp8, 2 4-bit, the default). ``attention``: the split decode attention
(``paged_attention._paged_attention_kernel``, M3 shape, 8 warps). ``block``: the prefill's
KV-outer block kernel (``sparse_attention._block_attention_kernel``, M3 shape). Prints the instruction count by
opcode (the whole kernel; its loop is most of it) and writes the listing to /tmp/<kernel>.sass.
"""

import collections
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget

from msattn.ops import indexer, paged_attention, sparse_attention

BIN = triton.__path__[0] + "/backends/nvidia/bin/"


def parse(value: str):
    if value.isdigit():
        return int(value)
    return {"True": True, "False": False}.get(value, value)


def _attention_pointers(const: dict) -> dict:
    """Pointer types of the attention kernels (decode and prefill block): bf16 q and outputs,
    bf16 or (``KV_FP8``) fp8 K/V, float32 scales and LSEs."""
    kv = "*fp8e4nv" if const["KV_FP8"] else "*bf16"
    return {"q_ptr": "*bf16", "o_ptr": "*bf16", "partial_o_ptr": "*bf16", "k_ptr": kv,
            "v_ptr": kv, "k_scale_ptr": "*fp32", "v_scale_ptr": "*fp32", "lse_ptr": "*fp32",
            "partial_lse_ptr": "*fp32"}


# kernel -> (function, constexprs, launch options, pointer types by name given the constexprs)
KERNELS = {
    "scores": (indexer._block_scores_kernel,
               dict(NUM_GROUPS=4, INDEX_DIM=128, BLOCK_D=128, BLOCK_R=16, BLOCK_N=128,
                    BLOCK_SIZE=128, INIT_BLOCKS=0, LOCAL_BLOCKS=1, PAGED=True, KEY_FORMAT=2,
                    PTX_DECODE=True, PDL_TRIGGER=True, DOT_PRECISION="ieee", DOT_UPCAST=False),
               {"num_warps": 4, "num_stages": 2},
               lambda c: {"ki_ptr": {2: "*u8", 1: "*fp8e4nv"}.get(c["KEY_FORMAT"], "*bf16"),
                          "qi_ptr": "*bf16", "key_scale_ptr": "*fp32", "scores_ptr": "*fp32",
                          "block_scale_ptr": "*fp8e4nv"}),
    "attention": (paged_attention._paged_attention_kernel,
                  dict(GROUP_SIZE=16, BLOCK_H=16, TOPK=16, HEAD_DIM=128, BLOCK_D=128,
                       PAGE_SIZE=128, BLOCK_N=128, TILES_PER_PAGE=1, SPLIT=True, TOPK_PAD=16,
                       PDL=True, KV_FP8=False, DOT_PRECISION="tf32", DOT_UPCAST=False),
                  {"num_warps": 8, "num_stages": 2},
                  _attention_pointers),
    "block": (sparse_attention._block_attention_kernel,
              dict(GROUP_SIZE=16, BLOCK_H=16, TOPK=16, TOPK_PAD=16, HEAD_DIM=128, BLOCK_D=128,
                   BLOCK_M=64, BLOCK_SIZE=128, TILES_PER_PROGRAM=16, MERGE=True, KV_FP8=False,
                   DOT_PRECISION="tf32", DOT_UPCAST=False),
              {"num_warps": 4, "num_stages": 1},
              _attention_pointers),
}
FLOAT_SCALARS = ("scale", "scale_log2")


def main(argv) -> None:
    name = argv[0] if argv and "=" not in argv[0] else "scores"
    fn, const, options, pointer_types = KERNELS[name]
    const, options = dict(const), dict(options)
    for key, value in (a.split("=", 1) for a in argv if "=" in a):
        (options if key in options else const)[key] = parse(value)
    pointers = pointer_types(const)
    signature = {}
    for arg in fn.arg_names:
        if arg in const:
            signature[arg] = "constexpr"
        elif arg in pointers:
            signature[arg] = pointers[arg]
        elif arg.endswith("_ptr"):
            signature[arg] = "*i32"
        else:
            signature[arg] = "fp32" if arg in FLOAT_SCALARS else "i32"
    # As the JIT specialises them at run time: 16-byte aligned pointers, strides divisible by 16.
    attrs = {(i,): [["tt.divisibility", 16]] for i, arg in enumerate(fn.arg_names)
             if signature[arg] != "constexpr" and (arg.endswith("_ptr") or arg.startswith("stride"))}
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=const, attrs=attrs)
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        sass = subprocess.run([BIN + "nvdisasm", "-c", cubin.name], capture_output=True,
                              text=True, check=True).stdout
        usage = subprocess.run([BIN + "cuobjdump", "-res-usage", cubin.name], capture_output=True,
                               text=True, check=True).stdout
    ops = collections.Counter()
    for line in sass.splitlines():
        match = re.match(r"\s*/\*[0-9a-f]+\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if match:
            ops[match.group(2).split(".")[0]] += 1
    registers = re.search(r"REG:(\d+)", usage)
    print(f"{sum(ops.values())} instructions, {registers.group(1) if registers else '?'} registers "
          f"a thread, {kernel.metadata.shared} bytes of shared memory")
    print(", ".join(f"{op} {n}" for op, n in ops.most_common(20)))
    with open(f"/tmp/{name}.sass", "w") as listing:
        listing.write(sass)


if __name__ == "__main__":
    main(sys.argv[1:])
