"""Command line: ``msattn bench [prefill|cpu|prefill-chunked|prefill-chunked-cpu|decode|decode-multi|
decode-cpu|train|train-cpu|hf|hf-cpu] [options]``.

Bare ``msattn bench`` runs the prefill suite on the GPU when CUDA is available, else the CPU
suite: the reference backend at CPU-sized inputs, with selection statistics. ``decode`` times one
decode step (batch 1, one query token, bf16 and fp8 index keys) against paged caches as CUDA-graph
replays; ``decode-multi`` does so for batches of 8/32/64 requests with 1 and 8 query tokens each;
``decode-cpu`` runs the decode pipeline on the CPU with the reference backend (a smoke test).
The GPU decode suites time vLLM's Triton decode beside msattn's where its files are (see
:mod:`msattn.bench.peer`), and record each step's kernel times (``--no-breakdown`` skips them).
``train`` times one training step of the attention (selection, sparse attention forward and
backward, indexer loss forward and backward) against dense causal attention forward + backward;
``train-cpu`` runs it on the CPU (reference backend, tiny shapes). ``hf`` times an M3-shaped
transformers ``MiniMaxM3VLForCausalLM`` (prefill and ``generate()``) with ``"sdpa"`` against
``"msattn"``; ``hf-cpu`` at tiny sizes on the CPU. ``prefill-chunked`` times chunks of new
tokens against paged prefixes (``--shapes`` requests x chunk x prefix) through
``msa_paged_attention``, beside vLLM's prefill; ``prefill-chunked-cpu`` at tiny sizes.
Results go to a table on stdout and a JSON file (plus a speedup plot when matplotlib imports)
under ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from functools import partial
from pathlib import Path
from typing import Iterator, Sequence

import torch

from msattn.dispatch import NAMES as BACKENDS
from msattn.bench import chunked, decode, dense, hf, peer, prefill, report, train
from msattn.bench.timing import matmul_tflops
from msattn.config import MSAConfig

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20}


def parse_length(text: str) -> int:
    """``"4096" -> 4096``, ``"8k" -> 8192``, ``"1m" -> 1048576`` (powers of 1024)."""
    match = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)\s*", text)
    if not match or int(match[1]) == 0:
        raise argparse.ArgumentTypeError(f"bad length {text!r}: expected a positive count such as "
                                         "4096, 8k or 1m")
    return int(match[1]) * _UNITS[match[2].lower()]


def parse_lengths(text: str) -> tuple[int, ...]:
    """Comma-separated lengths: ``"8k,16k,1m"``."""
    return tuple(parse_length(part) for part in text.split(","))


def parse_chunk_shapes(text: str) -> tuple[tuple[int, int, int], ...]:
    """Comma-separated ``RxCxP`` shapes: requests x chunk tokens x prefix tokens (``0`` for no
    prefix), e.g. ``"1x2kx64k,4x1kx16k"``."""
    shapes = []
    for part in text.split(","):
        pieces = part.lower().split("x")
        if len(pieces) != 3:
            raise argparse.ArgumentTypeError(f"bad shape {part!r}: expected requests x chunk x "
                                             "prefix, e.g. 1x2kx64k")
        prefix = 0 if pieces[2].strip() == "0" else parse_length(pieces[2])
        shapes.append((positive_int(pieces[0]), parse_length(pieces[1]), prefix))
    return tuple(shapes)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def positive_ints(text: str) -> tuple[int, ...]:
    """Comma-separated positive integers, sorted and without repeats: ``"8,1" -> (1, 8)``."""
    try:
        return tuple(sorted({positive_int(part) for part in text.split(",")}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")


def _some_of(text: str, allowed: Sequence[str], what: str) -> tuple[str, ...]:
    """Comma-separated names among ``allowed``, without repeats; ``what`` names them in the error
    (``"bad <what>(s) ...: expected some of ..."``)."""
    names = tuple(dict.fromkeys(part.strip() for part in text.split(",")))
    bad = [name for name in names if name not in allowed]
    if bad:
        raise argparse.ArgumentTypeError(f"bad {what}(s) {', '.join(map(repr, bad))}: expected "
                                         f"some of {', '.join(allowed)}")
    return names


def _impls(text: str) -> tuple[str, ...]:
    """Comma-separated attention implementations among ``hf.IMPLS``."""
    return _some_of(text, hf.IMPLS, "implementation")


def _dense_kernels(text: str) -> tuple[str, ...]:
    """Comma-separated dense kernels among ``dense.CANDIDATES``."""
    return _some_of(text, tuple(dense.CANDIDATES["cuda"]), "dense kernel")


def index_dtypes(text: str) -> tuple[str, ...]:
    """Comma-separated index-key dtypes among ``decode.INDEX_DTYPES``: ``"bf16,fp8"``."""
    return _some_of(text, decode.INDEX_DTYPES, "index dtype")


def workloads(text: str) -> tuple[str, ...]:
    """Comma-separated index-query workloads among ``decode.WORKLOADS``."""
    return _some_of(text, decode.WORKLOADS, "workload")


@dataclasses.dataclass(frozen=True)
class Suite:
    """Defaults of a suite; every one of them can be overridden on the command line."""

    op: str
    device: str
    config: MSAConfig
    lengths: tuple[int, ...]
    dtype: str
    backend: str
    warmup: int
    repeats: int
    time_budget_s: float
    out: str
    matmul_size: int  # side of the square matrix product that measures the compute ceiling
    columns: tuple[str, ...]
    # Decode suites (kind "decode") only:
    kind: str = "prefill"
    batches: tuple[int, ...] = (1,)
    q_tokens: tuple[int, ...] = (1,)
    index_dtypes: tuple[str, ...] = ()
    graphs: bool = False
    copy_mib: int = 0  # buffer of the copy-bandwidth ceiling
    workloads: tuple[str, ...] = ("random",)
    breakdown: bool = False  # per-kernel device times of each step
    # The chunked-prefill suites (kind "chunked") only: (requests, chunk, prefix)
    shapes: tuple[tuple[int, int, int], ...] = ()
    # The transformers suites (kind "hf") only:
    gen_lengths: tuple[int, ...] = ()
    new_tokens: int = 0
    hidden_size: int = 0
    layers: int = 0
    vocab_size: int = 0
    mlp_size: int = 0


SUITES = {
    # M3's shape at 8K..1M tokens on the GPU.
    "prefill": Suite(op="prefill", device="cuda", config=MSAConfig(),
                     lengths=parse_lengths("8k,16k,32k,64k,128k,256k,512k,1m"), dtype="bf16",
                     backend="triton", warmup=5, repeats=20, time_budget_s=10.0,
                     out="benchmarks/results", matmul_size=8192, columns=report.GPU_COLUMNS),
    # A small shape whose selection is still sparse, sized for a 2-core CPU (well under 2 min).
    "cpu": Suite(op="prefill-cpu", device="cpu",
                 config=MSAConfig(num_heads=8, num_kv_heads=2, num_index_heads=2, head_dim=64,
                                  index_dim=64, block_size=128, topk=4),
                 lengths=parse_lengths("1k,2k,4k"), dtype="fp32", backend="reference", warmup=1,
                 repeats=3, time_budget_s=5.0, out="benchmarks/results/local", matmul_size=1024,
                 columns=report.CPU_COLUMNS),
    # One decode step of M3 against paged caches, batch 1, one query token, CUDA-graph replays.
    "decode": Suite(op="decode", device="cuda", config=MSAConfig(),
                    lengths=parse_lengths("8k,16k,32k,64k,128k,256k,512k,1m"), dtype="bf16",
                    backend="triton", warmup=10, repeats=100, time_budget_s=1.0,
                    out="benchmarks/results", matmul_size=0, columns=report.DECODE_COLUMNS,
                    kind="decode", index_dtypes=("bf16", "fp8"), graphs=True, copy_mib=2048,
                    breakdown=True),
    # Batched decode: 8/32/64 requests, 1 and 8 query tokens per request (tokens/s).
    "decode-multi": Suite(op="decode-multi", device="cuda", config=MSAConfig(),
                          lengths=parse_lengths("4k,16k,64k,200k"), dtype="bf16", backend="triton",
                          warmup=10, repeats=100, time_budget_s=1.0, out="benchmarks/results",
                          matmul_size=0, columns=report.DECODE_MULTI_COLUMNS, kind="decode",
                          batches=(8, 32, 64), q_tokens=(1, 8), index_dtypes=("bf16", "fp8"),
                          graphs=True, copy_mib=2048, workloads=decode.WORKLOADS, breakdown=True),
    # The decode pipeline on the CPU: reference backend, eager calls (a smoke test).
    "decode-cpu": Suite(op="decode-cpu", device="cpu",
                        config=MSAConfig(num_heads=8, num_kv_heads=2, num_index_heads=2,
                                         head_dim=64, index_dim=64, block_size=128, topk=4),
                        lengths=parse_lengths("2k,8k,32k"), dtype="fp32", backend="reference",
                        warmup=1, repeats=5, time_budget_s=2.0, out="benchmarks/results/local",
                        matmul_size=0, columns=report.DECODE_COLUMNS, kind="decode",
                        index_dtypes=("bf16", "fp8"), copy_mib=256),
    # One training step of M3's attention (select, sparse attention fwd + bwd, indexer loss
    # fwd + bwd) against dense causal attention fwd + bwd.
    "train": Suite(op="train", device="cuda", config=MSAConfig(),
                   lengths=parse_lengths("8k,16k,32k,64k,128k,256k,512k"), dtype="bf16",
                   backend="triton", warmup=3, repeats=10, time_budget_s=5.0,
                   out="benchmarks/results", matmul_size=8192, columns=train.COLUMNS, kind="train"),
    # The training step on the CPU: reference backend, tiny shapes (a smoke test).
    "train-cpu": Suite(op="train-cpu", device="cpu",
                       config=MSAConfig(num_heads=4, num_kv_heads=2, num_index_heads=2,
                                        head_dim=32, index_dim=32, block_size=64, topk=3),
                       lengths=parse_lengths("512,1k,2k"), dtype="fp32", backend="reference",
                       warmup=1, repeats=3, time_budget_s=2.0, out="benchmarks/results/local",
                       matmul_size=512, columns=train.CPU_COLUMNS, kind="train"),
    # transformers' MiniMaxM3VLForCausalLM with M3's attention (random weights, tiny MLPs):
    # prefill and generate(), "sdpa" against "msattn".
    "hf": Suite(op="hf", device="cuda", config=MSAConfig(),
                lengths=parse_lengths("8k,16k,32k,64k,128k"), dtype="bf16", backend="triton",
                warmup=1, repeats=5, time_budget_s=3.0, out="benchmarks/results", matmul_size=0,
                columns=hf.COLUMNS, kind="hf", gen_lengths=parse_lengths("16k,64k"),
                new_tokens=32, hidden_size=6144, layers=4, vocab_size=1024, mlp_size=256),
    # Chunks of new tokens against paged prefixes (msa_paged_attention), beside vLLM's prefill.
    "prefill-chunked": Suite(op="prefill-chunked", device="cuda", config=MSAConfig(), lengths=(),
                             dtype="bf16", backend="triton", warmup=3, repeats=20,
                             time_budget_s=3.0, out="benchmarks/results", matmul_size=0,
                             columns=chunked.COLUMNS, kind="chunked",
                             shapes=parse_chunk_shapes("1x512x16k,1x1kx16k,1x2kx64k,4x2kx64k,"
                                                       "1x8kx256k,2x4kx128k,1x16kx1m")),
    "prefill-chunked-cpu": Suite(op="prefill-chunked-cpu", device="cpu",
                                 config=MSAConfig(num_heads=4, num_kv_heads=2, num_index_heads=2,
                                                  head_dim=16, index_dim=16, block_size=32,
                                                  topk=3),
                                 lengths=(), dtype="fp32", backend="reference", warmup=1,
                                 repeats=2, time_budget_s=1.0, out="benchmarks/results/local",
                                 matmul_size=0, columns=chunked.COLUMNS, kind="chunked",
                                 shapes=parse_chunk_shapes("1x64x0,2x64x256")),
    # The same on the CPU at tiny sizes (reference backend; a smoke test).
    "hf-cpu": Suite(op="hf-cpu", device="cpu",
                    config=MSAConfig(num_heads=4, num_kv_heads=2, num_index_heads=2, head_dim=32,
                                     index_dim=32, block_size=16, topk=2),
                    lengths=parse_lengths("64,128"), dtype="fp32", backend="reference",
                    warmup=1, repeats=2, time_budget_s=1.0, out="benchmarks/results/local",
                    matmul_size=0, columns=hf.COLUMNS, kind="hf", gen_lengths=(96,),
                    new_tokens=4, hidden_size=64, layers=3, vocab_size=128, mlp_size=32),
}
# The CPU counterpart of each GPU suite (named when a GPU suite is asked for without CUDA).
_CPU_SUITES = {"prefill": "cpu", "decode": "decode-cpu", "decode-multi": "decode-cpu",
               "train": "train-cpu", "hf": "hf-cpu", "prefill-chunked": "prefill-chunked-cpu"}

# Command-line option -> MSAConfig field(s).
_CONFIG_OPTIONS = {
    "heads": ("num_heads",),
    "kv_heads": ("num_kv_heads", "num_index_heads"),
    "head_dim": ("head_dim",),
    "index_dim": ("index_dim",),
    "block_size": ("block_size",),
    "topk": ("topk",),
    "init_blocks": ("init_blocks",),
    "local_blocks": ("local_blocks",),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="msattn", description="MiniMax Sparse Attention tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser(
        "bench", help="benchmark MSA prefill against dense attention",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_argument("suite", nargs="?", choices=sorted(SUITES),
                       help="prefill: M3 shape on the GPU; cpu: reference backend at CPU sizes "
                            "(default: prefill with CUDA, else cpu); decode, decode-multi: M3 "
                            "decode against paged caches on the GPU; decode-cpu: the decode "
                            "pipeline on the CPU; train, train-cpu: one training step of the "
                            "attention; hf, hf-cpu: transformers' MiniMax-M3, sdpa vs msattn; "
                            "prefill-chunked(-cpu): chunks against paged prefixes")
    shape = bench.add_argument_group("shape (defaults: the suite's)")
    shape.add_argument("--lengths", type=parse_lengths, help="e.g. 8k,16k,32k,1m")
    shape.add_argument("--shapes", type=parse_chunk_shapes,
                       help="prefill-chunked suites: requests x chunk x prefix, e.g. 1x2kx64k,4x1kx0")
    shape.add_argument("--batch", type=positive_int, help="sequences per call (default 1)")
    shape.add_argument("--heads", type=positive_int, help="query heads H")
    shape.add_argument("--kv-heads", type=positive_int, help="KV heads = index heads G")
    shape.add_argument("--head-dim", type=positive_int, help="D")
    shape.add_argument("--index-dim", type=positive_int, help="Di")
    shape.add_argument("--block-size", type=positive_int, help="KV block size (power of two)")
    shape.add_argument("--topk", type=positive_int, help="selected blocks per query and group")
    shape.add_argument("--init-blocks", type=int, help="leading blocks always selected")
    shape.add_argument("--local-blocks", type=positive_int, help="trailing blocks always selected")
    shape.add_argument("--dtype", choices=sorted(DTYPES))
    dec = bench.add_argument_group("decode suites only")
    dec.add_argument("--batches", type=positive_ints, help="requests per step, e.g. 8,32,64 "
                     "(--batch N is the same as --batches N)")
    dec.add_argument("--q-tokens", type=positive_ints, help="query tokens per request, e.g. 1,8")
    dec.add_argument("--index-dtypes", type=index_dtypes,
                     help=f"index-key cache dtypes, some of {','.join(decode.INDEX_DTYPES)}")
    dec.add_argument("--no-graphs", action="store_true",
                     help="time eager calls instead of CUDA-graph replays")
    dec.add_argument("--steps-per-graph", type=positive_int, default=8,
                     help="consecutive steps in one CUDA graph (default 8; 1: one graph per step, "
                          "whose launch cost then counts in every step)")
    dec.add_argument("--workloads", type=workloads,
                     help=f"index-query workloads, some of {','.join(decode.WORKLOADS)} "
                          "(correlated: the tokens of a request near one base query)")
    dec.add_argument("--breakdown", action=argparse.BooleanOptionalAction,
                     help="record the device time of each kernel of a step (CUDA; default on "
                          "for decode and decode-multi)")
    dec.add_argument("--no-peer", action="store_true",
                     help="do not time vLLM's Triton decode (or prefill) beside msattn's (it runs "
                          f"where its files are in ${peer.PEER_DIR_ENV} or .peers/vllm_minimax_m3)")
    tf = bench.add_argument_group("hf suites only")
    tf.add_argument("--gen-lengths", type=parse_lengths,
                    help="prompt lengths of the generate() measurements, e.g. 16k,64k")
    tf.add_argument("--new-tokens", type=positive_int, help="tokens generate() produces")
    tf.add_argument("--hidden-size", type=positive_int, help="model width (default M3's 6144)")
    tf.add_argument("--layers", type=positive_int,
                    help="decoder layers: layer 0 full attention, the others MSA (>= 2)")
    tf.add_argument("--impls", type=_impls, help="attention implementations, some of "
                    f"{','.join(hf.IMPLS)}")
    run = bench.add_argument_group("run")
    run.add_argument("--backend", choices=BACKENDS, help="msattn backend of the MSA calls")
    run.add_argument("--warmup", type=positive_int, help="warm-up calls per measurement (at most)")
    run.add_argument("--repeats", type=positive_int, help="timed calls per measurement (at most)")
    run.add_argument("--time-budget", type=float, dest="time_budget_s", metavar="SECONDS",
                     help="time per measurement; fewer timed calls when they would take longer")
    run.add_argument("--no-dense", action="store_true", help="do not measure dense attention")
    run.add_argument("--dense-max-len", type=parse_length, help="skip dense beyond this length")
    run.add_argument("--dense-kernels", type=_dense_kernels,
                     help="dense kernels to race (prefill, train), some of "
                          f"{','.join(dense.CANDIDATES['cuda'])} (default: all)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--no-fp8-index", action="store_true",
                     help="prefill: do not time the fp8 index path (index_dtype=float8_e4m3fn) "
                          "beside the 16-bit one")
    out = bench.add_argument_group("output")
    out.add_argument("--out", type=Path, help="folder of the JSON and plot (default: the suite's)")
    out.add_argument("--no-plot", action="store_true", help="do not write the speedup plot")
    return parser


def _config(args: argparse.Namespace, suite: Suite, parser) -> MSAConfig:
    overrides = {field: getattr(args, option) for option, fields in _CONFIG_OPTIONS.items()
                 for field in fields if getattr(args, option) is not None}
    try:
        return dataclasses.replace(suite.config, **overrides)
    except (TypeError, ValueError) as error:
        parser.error(str(error))


def _pick(args: argparse.Namespace, suite: Suite, name: str):
    """The command line's value of option ``name``, else the suite's default."""
    value = getattr(args, name)
    return getattr(suite, name) if value is None else value


def _settings(args: argparse.Namespace, suite: Suite, parser) -> prefill.PrefillSettings:
    config = _config(args, suite, parser)

    pick = partial(_pick, args, suite)

    return prefill.PrefillSettings(
        op=suite.op, device=torch.device(suite.device), config=config, lengths=pick("lengths"),
        batch=args.batch or 1, dtype=DTYPES[pick("dtype")], backend=pick("backend"),
        warmup=pick("warmup"), repeats=pick("repeats"), time_budget_s=pick("time_budget_s"),
        dense=not args.no_dense, dense_max_len=args.dense_max_len, seed=args.seed,
        dense_kernels=args.dense_kernels,
        fp8_index=suite.op == "prefill" and not args.no_fp8_index,
        peer=suite.op == "prefill" and not args.no_peer)


def _header(env: dict, settings: prefill.PrefillSettings, ceiling: float, matmul_size: int) -> str:
    c = settings.config
    return (f"MSA {settings.op} on {env['device']}: backend {settings.backend} "
            f"({prefill.executed_path(settings)}), {report.dtype_name(settings.dtype)}, "
            f"batch {settings.batch}, H={c.num_heads} G={c.num_kv_heads} D={c.head_dim} "
            f"Di={c.index_dim}, block {c.block_size}, top-{c.topk} (init {c.init_blocks}, "
            f"local {c.local_blocks})\n"
            f"matmul ceiling ({matmul_size}^3 {report.dtype_name(settings.dtype)}): "
            f"{ceiling:.1f} TFLOP/s")


def _decode_settings(args: argparse.Namespace, suite: Suite, parser) -> decode.DecodeSettings:
    config = _config(args, suite, parser)
    if args.batch is not None and args.batches is not None:
        parser.error("give --batch or --batches, not both")
    if args.dense_kernels is not None:
        parser.error("--dense-kernels: for the prefill and train suites (decode races its own)")
    batches = args.batches or ((args.batch,) if args.batch else suite.batches)

    pick = partial(_pick, args, suite)

    return decode.DecodeSettings(
        op=suite.op, device=torch.device(suite.device), config=config, lengths=pick("lengths"),
        batches=batches, q_tokens=pick("q_tokens"), index_dtypes=pick("index_dtypes"),
        dtype=DTYPES[pick("dtype")], backend=pick("backend"),
        graphs=suite.graphs and not args.no_graphs, warmup=pick("warmup"),
        repeats=pick("repeats"), time_budget_s=pick("time_budget_s"), dense=not args.no_dense,
        dense_max_len=args.dense_max_len, bandwidth_bytes=suite.copy_mib << 20, seed=args.seed,
        workloads=pick("workloads"), peer=not args.no_peer, breakdown=pick("breakdown"),
        steps_per_graph=args.steps_per_graph)


def _decode_header(env: dict, settings: decode.DecodeSettings, bandwidth_gbps: float) -> str:
    c = settings.config
    methods = ", ".join(sorted({decode.msa_method(settings, t) for t in settings.q_tokens}))
    return (f"MSA {settings.op} on {env['device']}: backend {settings.backend} ({methods}), "
            f"q/K/V {report.dtype_name(settings.dtype)}, index keys "
            f"{'/'.join(settings.index_dtypes)}, batch {','.join(map(str, settings.batches))}, "
            f"query tokens {','.join(map(str, settings.q_tokens))}, H={c.num_heads} "
            f"G={c.num_kv_heads} D={c.head_dim} Di={c.index_dim}, page {c.block_size}, "
            f"top-{c.topk} (init {c.init_blocks}, local {c.local_blocks}), workloads "
            f"{','.join(settings.workloads)}\n"
            f"bandwidth ceiling (best of a {settings.bandwidth_bytes >> 20} MiB copy and read): "
            f"{bandwidth_gbps:,.0f} GB/s; vLLM peer: "
            f"{decode.peer_skip_reason(settings, [1]) or f'from {peer.peer_dir()}'}")


def _decode_series(row: dict, *, several: bool) -> str:
    """The plot line of a decode row: its index dtype, with batch and query tokens if they vary."""
    workload = "" if row.get("workload", "random") == "random" else f" {row['workload']}"
    if several:
        return f"B={row['batch']} q={row['q_tokens']} {row['index_dtype']}{workload}"
    return f"index {row['index_dtype']}{workload}"


def _record(args: argparse.Namespace, suite_name: str, command: list[str], env: dict, settings,
            ceilings: dict, rows: Iterator[dict], header: str, *, cells=None, series=None,
            table=None) -> int:
    """Collect the rows into the JSON document (rewritten after each row, so that a crash keeps
    what was measured), then print the header and the table and write the plot. ``table(rows)``
    formats the table when given (else :func:`report.format_table` with ``cells``)."""
    suite = SUITES[suite_name]
    out = args.out or Path(suite.out)
    stem = report.output_stem(settings.op, env)
    json_path = out / f"{stem}.json"
    document = {**env, "command": command, "suite": suite_name, "settings": settings.to_dict(),
                "ceilings": ceilings, "rows": []}
    for row in rows:
        document["rows"].append(row)
        report.write_json(json_path, document)
    print(header)
    print(table(document["rows"]) if table else
          report.format_table(document["rows"], suite.columns, cells))
    print(f"results: {json_path}")
    plot_path = out / f"{stem}.png"
    title = f"MSA {settings.op} speedup, {env['device']}"
    if not args.no_plot and report.plot_speedup(document["rows"], plot_path, title, series):
        print(f"plot: {plot_path}")
    return 0


def bench_decode(args: argparse.Namespace, parser: argparse.ArgumentParser, command: list[str],
                 suite_name: str) -> int:
    """Run a decode suite (see :mod:`msattn.bench.decode`); returns the exit code."""
    settings = _decode_settings(args, SUITES[suite_name], parser)
    try:
        for q_tokens in settings.q_tokens:
            decode.msa_method(settings, q_tokens)
    except (ImportError, ValueError) as error:
        parser.error(f"backend {settings.backend!r} cannot run the paged MSA on "
                     f"{settings.device.type}: {error}")
    env = report.environment(settings.device)
    progress = report.Progress(len(settings.lengths) * len(settings.batches) + 1)
    progress.step("bandwidth ceiling")
    bandwidth_gbps = decode.bandwidth_ceiling_gbps(settings)
    return _record(args, suite_name, command, env, settings,
                   {"bandwidth_gbps": bandwidth_gbps, "bandwidth_bytes": settings.bandwidth_bytes},
                   decode.run(settings, progress, bandwidth_gbps),
                   _decode_header(env, settings, bandwidth_gbps), cells=report.DECODE_CELLS,
                   series=partial(_decode_series, several=len(settings.batches) > 1
                                  or len(settings.q_tokens) > 1))


def _bench_lengths(args: argparse.Namespace, parser: argparse.ArgumentParser, command: list[str],
                   suite_name: str, *, executed_path, run, header, cells=None) -> int:
    """Run a suite of one row per length against the matmul ceiling (prefill and train):
    ``executed_path(settings)`` checks the backend, ``run(settings, progress)`` yields the rows,
    ``header(env, settings, ceiling, matmul_size)`` heads the table of ``cells``."""
    suite = SUITES[suite_name]
    settings = _settings(args, suite, parser)
    try:
        executed_path(settings)
    except (ImportError, ValueError) as error:
        parser.error(f"backend {settings.backend!r} cannot run on {settings.device.type}: {error} "
                     "(--backend reference times the PyTorch reference)")
    env = report.environment(settings.device)
    progress = report.Progress(len(settings.lengths) + 1)
    progress.step("matmul ceiling")
    ceiling = matmul_tflops(settings.device, settings.dtype, suite.matmul_size, **settings.timing())
    return _record(args, suite_name, command, env, settings,
                   {"matmul_tflops": ceiling, "matmul_size": suite.matmul_size},
                   run(settings, progress), header(env, settings, ceiling, suite.matmul_size),
                   cells=cells)


def bench_train(args: argparse.Namespace, parser: argparse.ArgumentParser, command: list[str],
                suite_name: str) -> int:
    """Run a training suite (see :mod:`msattn.bench.train`); returns the exit code."""
    return _bench_lengths(args, parser, command, suite_name, executed_path=train.executed_path,
                          run=train.run, header=train.header, cells=train.CELLS)


def bench_prefill(args: argparse.Namespace, parser: argparse.ArgumentParser, command: list[str],
                  suite_name: str) -> int:
    """Run a prefill suite (see :mod:`msattn.bench.prefill`); returns the exit code."""
    return _bench_lengths(args, parser, command, suite_name, executed_path=prefill.executed_path,
                          run=prefill.run, header=_header)


def bench_chunked(args: argparse.Namespace, parser: argparse.ArgumentParser, command: list[str],
                  suite_name: str) -> int:
    """Run a chunked-prefill suite (see :mod:`msattn.bench.chunked`); returns the exit code."""
    suite = SUITES[suite_name]
    if args.lengths is not None or args.batch is not None:
        parser.error("--lengths, --batch: not for the prefill-chunked suites (use --shapes)")
    if args.no_dense or args.dense_max_len is not None or args.dense_kernels is not None:
        parser.error("--no-dense, --dense-max-len, --dense-kernels: not for the prefill-chunked "
                     "suites")
    pick = partial(_pick, args, suite)
    settings = chunked.ChunkedSettings(
        op=suite.op, device=torch.device(suite.device), config=_config(args, suite, parser),
        shapes=pick("shapes"), dtype=DTYPES[pick("dtype")], backend=pick("backend"),
        warmup=pick("warmup"), repeats=pick("repeats"), time_budget_s=pick("time_budget_s"),
        peer=suite.device == "cuda" and not args.no_peer, seed=args.seed)
    env = report.environment(settings.device)
    progress = report.Progress(len(settings.shapes))
    return _record(args, suite_name, command, env, settings, {}, chunked.run(settings, progress),
                   chunked.header(env, settings), cells=chunked.CELLS)


def _hf_settings(args: argparse.Namespace, suite: Suite, parser) -> hf.HFSettings:
    config = _config(args, suite, parser)
    if args.batch not in (None, 1):
        parser.error("the hf suites run batch 1 only")
    if args.no_dense or args.dense_max_len is not None or args.dense_kernels is not None:
        parser.error("--no-dense, --dense-max-len, --dense-kernels: not for the hf suites "
                     "(use --impls)")
    pick = partial(_pick, args, suite)
    layers = pick("layers")
    if layers < 2:
        parser.error("--layers: at least 2 (layer 0 full attention, then MSA layers)")
    return hf.HFSettings(
        op=suite.op, device=torch.device(suite.device), config=config, lengths=pick("lengths"),
        gen_lengths=pick("gen_lengths"), new_tokens=pick("new_tokens"),
        hidden_size=pick("hidden_size"), num_layers=layers, vocab_size=suite.vocab_size,
        mlp_size=suite.mlp_size, dtype=DTYPES[pick("dtype")], backend=pick("backend"),
        warmup=pick("warmup"), repeats=pick("repeats"), time_budget_s=pick("time_budget_s"),
        impls=args.impls or hf.IMPLS, seed=args.seed)


def bench_hf(args: argparse.Namespace, parser: argparse.ArgumentParser, command: list[str],
             suite_name: str) -> int:
    """Run a transformers suite (see :mod:`msattn.bench.hf`); returns the exit code."""
    settings = _hf_settings(args, SUITES[suite_name], parser)
    try:
        import transformers
        import msattn.integrations.transformers  # noqa: F401
        hf.text_config(settings)
    except (ImportError, ValueError) as error:
        parser.error(f"the {suite_name} suite cannot run: {error}")
    env = {**report.environment(settings.device), "transformers": transformers.__version__}
    progress = report.Progress(1 + len(settings.lengths) + len(settings.gen_lengths))
    return _record(args, suite_name, command, env, settings, {}, hf.run(settings, progress),
                   hf.header(env, settings), series=lambda row: row["mode"],
                   table=hf.format_table)


def bench(args: argparse.Namespace, parser: argparse.ArgumentParser, command: list[str]) -> int:
    """Run a suite, print its table, write its JSON (and plot); returns the exit code."""
    suite_name = args.suite or ("prefill" if torch.cuda.is_available() else "cpu")
    suite = SUITES[suite_name]
    if suite.device == "cuda" and not torch.cuda.is_available():
        cpu_suite = _CPU_SUITES.get(suite_name, "cpu")
        parser.error(f"the {suite_name} suite needs a CUDA GPU; `msattn bench {cpu_suite}` runs "
                     f"its CPU counterpart (`msattn bench` without a suite runs the CPU suite)")
    hf_only = [option for option, value in (("--gen-lengths", args.gen_lengths),
                                             ("--new-tokens", args.new_tokens),
                                             ("--hidden-size", args.hidden_size),
                                             ("--layers", args.layers),
                                             ("--impls", args.impls)) if value]
    if hf_only and suite.kind != "hf":
        parser.error(f"{', '.join(hf_only)}: only for the hf suites")
    if args.shapes is not None and suite.kind != "chunked":
        parser.error("--shapes: only for the prefill-chunked suites")
    if args.no_fp8_index and suite.op != "prefill":
        parser.error("--no-fp8-index: only for the prefill suite (no other suite times the fp8 "
                     "index path)")
    if args.no_peer and suite.kind not in ("decode", "chunked") and suite.op != "prefill":
        parser.error("--no-peer: only for the decode, prefill and prefill-chunked suites")
    if suite.kind == "decode":
        return bench_decode(args, parser, command, suite_name)
    decode_only = [option for option, value in (("--batches", args.batches),
                                                 ("--q-tokens", args.q_tokens),
                                                 ("--index-dtypes", args.index_dtypes),
                                                 ("--no-graphs", args.no_graphs),
                                                 ("--workloads", args.workloads),
                                                 ("--breakdown", args.breakdown is not None))
                   if value]
    if decode_only:
        parser.error(f"{', '.join(decode_only)}: only for the decode suites")
    if suite.kind == "chunked":
        return bench_chunked(args, parser, command, suite_name)
    if suite.kind == "hf":
        return bench_hf(args, parser, command, suite_name)
    if suite.kind == "train":
        return bench_train(args, parser, command, suite_name)
    return bench_prefill(args, parser, command, suite_name)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``msattn`` command; ``argv`` defaults to the process's arguments."""
    parser = build_parser()
    args = parser.parse_args(argv)
    command = list(sys.argv) if argv is None else ["msattn", *argv]
    return bench(args, parser, command)


if __name__ == "__main__":
    sys.exit(main())
