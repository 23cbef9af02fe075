"""Presentation of benchmark results: progress lines, the text table, the JSON file and the plot."""

from __future__ import annotations

import json
import platform
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import torch


def format_length(n: int) -> str:
    """``8192 -> "8K"``, ``1048576 -> "1M"``, ``1000 -> "1000"``."""
    for suffix, unit in (("M", 1 << 20), ("K", 1 << 10)):
        if n and n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16 -> "bfloat16"``."""
    return str(dtype).removeprefix("torch.")


class Progress:
    """Progress lines on stderr: elapsed time, step counter, current step and stage."""

    def __init__(self, total: int, stream=None):
        self.total, self.index, self.label = total, 0, ""
        self.stream = stream if stream is not None else sys.stderr
        self.start = time.perf_counter()

    def step(self, label: str) -> None:
        self.index, self.label = self.index + 1, label
        self("start")

    def __call__(self, stage: str) -> None:
        elapsed = time.perf_counter() - self.start
        print(f"[{elapsed:8.1f}s] {self.index}/{self.total} {self.label}: {stage}",
              file=self.stream, flush=True)


# ----------------------------------------------------------------------------------------------
# Table
# ----------------------------------------------------------------------------------------------

def number_cell(key: str, spec: str, scale: float = 1.0, suffix: str = "") -> Callable[[dict], str]:
    """Cell of ``row[key]`` (times ``scale``) formatted with ``spec``, then ``suffix``; "-" for
    None."""
    def cell(row: dict) -> str:
        value = row.get(key)
        return "-" if value is None else f"{value * scale:{spec}}{suffix}"
    return cell


def _selection(key: str, spec: str, scale: float = 1.0, suffix: str = "") -> Callable[[dict], str]:
    number = number_cell(key, spec, scale, suffix)
    return lambda row: number(row["selection"])


def dense_ms_cell(row: dict) -> str:
    """``dense_ms`` when dense was measured, else the dense status ("off", "skipped", ...)."""
    return number_cell("dense_ms", ".2f")(row) if row["dense_status"] == "measured" else row["dense_status"]


CELLS: dict[str, Callable[[dict], str]] = {
    "length": lambda row: format_length(row["seq_len"]),
    "indexer ms": number_cell("indexer_ms", ".2f"),
    "attention ms": number_cell("attention_ms", ".2f"),
    "MSA ms": number_cell("msa_ms", ".2f"),
    "dense ms": dense_ms_cell,
    "dense kernel": lambda row: row["dense_backend"] or "-",
    "speedup": number_cell("speedup", ".3g", suffix="x"),
    "indexer TFLOP/s": number_cell("indexer_tflops", ".1f"),
    "attention TFLOP/s": number_cell("attention_tflops", ".1f"),
    "peak extra GiB": number_cell("extra_memory_gib", ".2f"),
    "vLLM ms": number_cell("peer_ms", ",.2f"),
    "MSA / vLLM": number_cell("msa_over_peer", ".3g"),
    "fp8 indexer ms": number_cell("fp8_indexer_ms", ",.2f"),
    "fp8 MSA ms": number_cell("fp8_msa_ms", ",.2f"),
    "fp8 speedup": number_cell("fp8_speedup", ".3g", suffix="x"),
    "fp8 same rows": lambda row: ("-" if not row.get("fp8_agreement") else
                                  f"{row['fp8_agreement']['rows_identical']:.1%}"),
    "full rows": _selection("full_row_fraction", ".1f", 100, "%"),
    "blocks selected": _selection("selected_block_fraction", ".1f", 100, "%"),
    "distinct/qblock": _selection("distinct_blocks_per_query_block", ".1f"),
    "key sparsity": _selection("key_sparsity", ".1f", 100, "%"),
}

GPU_COLUMNS = ("length", "indexer ms", "attention ms", "MSA ms", "dense ms", "dense kernel",
               "speedup", "indexer TFLOP/s", "attention TFLOP/s", "peak extra GiB", "vLLM ms",
               "MSA / vLLM", "fp8 indexer ms", "fp8 MSA ms", "fp8 speedup", "fp8 same rows")
CPU_COLUMNS = ("length", "full rows", "blocks selected", "distinct/qblock", "key sparsity",
               "indexer ms", "attention ms", "MSA ms", "dense ms", "dense kernel", "speedup")


def _significant(key: str) -> Callable[[dict], str]:
    """Three significant digits below 100, whole numbers with thousands separators above
    (decode times are often < 0.1 ms, bandwidths in the thousands of GB/s)."""
    def cell(row: dict) -> str:
        value = row.get(key)
        if value is None:
            return "-"
        return f"{value:.3g}" if value < 100 else f"{value:,.0f}"
    return cell


def _decodedense_ms_cell(row: dict) -> str:
    return _significant("dense_ms")(row) if row["dense_status"] == "measured" else row["dense_status"]


# Decode rows (msattn.bench.decode): the same headers where the meaning is the same.
DECODE_CELLS: dict[str, Callable[[dict], str]] = {
    **CELLS,
    "batch": lambda row: str(row["batch"]),
    "q": lambda row: str(row["q_tokens"]),
    "index": lambda row: row["index_dtype"],
    "MSA ms": _significant("msa_ms"),
    "dense ms": _decodedense_ms_cell,
    "MSA GB/s": _significant("msa_gbps"),
    "dense GB/s": _significant("dense_gbps"),
    "MSA % bw": number_cell("msa_bandwidth_fraction", ".0f", 100, "%"),
    "dense % bw": number_cell("dense_bandwidth_fraction", ".0f", 100, "%"),
    "us/token": number_cell("ms_per_query_token", ".2f", 1e3),
    "tokens/s": number_cell("tokens_per_s", ",.0f"),
    "vs q=1": number_cell("tokens_per_s_vs_1q", ".2f", suffix="x"),
    "timing": lambda row: row["msa_method"],
}

DECODE_COLUMNS = ("length", "index", "MSA ms", "dense ms", "dense kernel", "speedup", "MSA GB/s",
                  "MSA % bw", "dense GB/s", "dense % bw", "timing")
DECODE_MULTI_COLUMNS = ("length", "batch", "q", "index", "MSA ms", "us/token", "tokens/s",
                        "vs q=1", "dense ms", "speedup", "MSA GB/s", "MSA % bw")

_NOTES = {
    "skipped": "dense skipped: longer than --dense-max-len (speedup null)",
    "off": "dense off: --no-dense (speedup null)",
    "failed": "dense failed with every kernel (see dense_failures in the JSON; speedup null)",
}


def grid_lines(rows: Sequence[dict], columns: Sequence[str],
               cells: dict[str, Callable[[dict], str]]) -> list[str]:
    """The lines of a right-aligned text table: the header, a rule, one line per row;
    ``cells[name](row)`` formats the cell of column ``name``."""
    table = [[cells[name](row) for name in columns] for row in rows]
    widths = [max(len(name), *(len(r[i]) for r in table)) for i, name in enumerate(columns)]
    lines = ["  ".join(name.rjust(w) for name, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in table]
    return lines


def format_table(rows: Sequence[dict], columns: Sequence[str],
                 cells: dict[str, Callable[[dict], str]] | None = None) -> str:
    """Right-aligned text table of ``rows``, then a note for each dense status that needs one.

    ``cells`` maps a column name to its formatter (default :data:`CELLS`)."""
    lines = grid_lines(rows, columns, CELLS if cells is None else cells)
    statuses = dict.fromkeys(row.get("dense_status") for row in rows)
    lines += [_NOTES[s] for s in statuses if s in _NOTES]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------

def environment(device: torch.device) -> dict:
    """What the numbers were measured on and with."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "gpu": gpu,
        "device": gpu or f"CPU {platform.machine()} ({torch.get_num_threads()} threads)",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
    }


def slug(text: str) -> str:
    """``"NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def output_stem(op: str, env: dict) -> str:
    """File name without extension: ``<op>_<device-slug>_<UTC date-time>``."""
    stamp = datetime.fromisoformat(env["date"]).strftime("%Y%m%d-%H%M%S")
    return f"{op}_{slug(env['gpu'] or 'cpu')}_{stamp}"


def write_json(path: Path, document: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")


def plot_speedup(rows: Sequence[dict], path: Path, title: str,
                 series: Callable[[dict], str] | None = None) -> bool:
    """Speedup over dense against sequence length (log2 axis) as a PNG; False when there is no
    measured speedup or matplotlib is missing.

    ``series(row)``, when given, names the line a row belongs to (one line per name, with a
    legend), e.g. its index dtype."""
    lines: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        if row["speedup"] is not None:
            lines.setdefault(series(row) if series else "", []).append((row["seq_len"], row["speedup"]))
    if not lines:
        return False
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points in lines.items():
        ax.plot(*zip(*sorted(points)), marker="o", label=label or None)
    if series:
        ax.legend()
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xscale("log", base=2)
    lengths = sorted({n for points in lines.values() for n, _ in points})
    ax.set_xticks(lengths, [format_length(n) for n in lengths])
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("speedup over dense (x)")
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
