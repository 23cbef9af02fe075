"""Compile the decode selection's score kernel (``indexer._block_scores_kernel``) for sm_90 on a
machine without a GPU and count its SASS instructions, its registers and its shared memory.
Needs a Triton with its NVIDIA backend (``pip install triton==3.6.0`` in a side venv works);
how the 4-bit decode was sized (benchmarks/README.md, 2026-12-07).

    python3 scripts/sass_block_scores.py [NAME=VALUE ...]    # constexpr overrides, e.g.
    python3 scripts/sass_block_scores.py KEY_FORMAT=1 BLOCK_N=64
    python3 scripts/sass_block_scores.py PTX_DECODE=False     # the 4-bit integer decode

KEY_FORMAT: 0 bf16 keys, 1 fp8, 2 4-bit (the default). Prints the instruction count by opcode
(the whole kernel; the loop over key blocks is most of it) and writes the listing to
/tmp/block_scores.sass.
"""

import collections
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget

from msattn.ops import indexer

BIN = triton.__path__[0] + "/backends/nvidia/bin/"


def parse(value: str):
    if value.isdigit():
        return int(value)
    return {"True": True, "False": False}.get(value, value)


def main(argv) -> None:
    fn = indexer._block_scores_kernel
    const = dict(NUM_GROUPS=4, INDEX_DIM=128, BLOCK_D=128, BLOCK_R=16, BLOCK_N=128,
                 BLOCK_SIZE=128, INIT_BLOCKS=0, LOCAL_BLOCKS=1, PAGED=True, KEY_FORMAT=2,
                 PTX_DECODE=True, PDL_TRIGGER=True, DOT_PRECISION="ieee", DOT_UPCAST=False)
    const.update((name, parse(value)) for name, value in (a.split("=", 1) for a in argv))
    keys = {2: "*u8", 1: "*fp8e4nv"}.get(const["KEY_FORMAT"], "*bf16")
    signature = {}
    for name in fn.arg_names:
        if name in const:
            signature[name] = "constexpr"
        elif name == "ki_ptr":
            signature[name] = keys
        elif name == "qi_ptr":
            signature[name] = "*bf16"
        elif name in ("key_scale_ptr", "scores_ptr"):
            signature[name] = "*fp32"
        elif name == "block_scale_ptr":
            signature[name] = "*fp8e4nv"
        elif name.endswith("_ptr"):
            signature[name] = "*i32"
        else:
            signature[name] = "fp32" if name == "scale" else "i32"
    # As the JIT specialises them at run time: 16-byte aligned pointers, strides divisible by 16.
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if signature[name] != "constexpr" and (name.endswith("_ptr") or name.startswith("stride"))}
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=const, attrs=attrs)
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": 4, "num_stages": 2})
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
    with open("/tmp/block_scores.sass", "w") as listing:
        listing.write(sass)


if __name__ == "__main__":
    main(sys.argv[1:])
