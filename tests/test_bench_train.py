"""The training benchmark (msattn bench train / train-cpu): the exact count of attended pairs, the
FLOP model, and the CPU suite end to end at a tiny size; a short GPU run."""

import json

import pytest
import torch

import msattn
from msattn.bench import cli, dense, train
from msattn.config import MSAConfig

TINY = ["--lengths", "256,512", "--heads", "4", "--kv-heads", "2", "--head-dim", "16",
        "--index-dim", "16", "--block-size", "32", "--topk", "3", "--warmup", "1",
        "--repeats", "2", "--time-budget", "1"]

ROW_KEYS = {"op", "seq_len", "batch", "msa_ms", "dense_ms", "speedup", "select_ms",
            "attention_fwd_ms", "attention_bwd_ms", "loss_fwd_ms", "loss_bwd_ms", "dense_fwd_ms",
            "dense_bwd_ms", "sparse_pairs", "sparse_elements", "sparse_bwd_flops",
            "sparse_bwd_tflops", "tokens_per_s", "peak_memory_gib", "extra_memory_gib",
            "dense_status", "dense_backend", "dense_candidates_ms", "dense_failures", "msa_path",
            "indexer_loss", "selection", "runs"}


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def brute_force_pairs(indices, cu_q, cu_k, block_size):
    """(group, query, key) triples with the key's block selected and key <= query, by a dense
    mask per sequence."""
    total = 0
    for b in range(len(cu_q) - 1):
        q0, q1, k0, k1 = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
        len_q, len_k = q1 - q0, k1 - k0
        positions = torch.arange(len_k - len_q, len_k)
        keys = torch.arange(len_k)
        causal = keys[None, :] <= positions[:, None]  # [len_q, len_k]
        for g in range(indices.shape[0]):
            selected = torch.zeros(len_q, len_k, dtype=torch.bool)
            for t in range(len_q):
                for c in indices[g, q0 + t].tolist():
                    if c >= 0:
                        selected[t, c * block_size:(c + 1) * block_size] = True
            total += int((selected & causal).sum())
    return total


def test_attended_pairs_matches_brute_force():
    gen = torch.Generator().manual_seed(0)
    block, topk, groups = 8, 3, 2
    # two sequences; the second has fewer queries than keys (its last positions)
    cu_q = torch.tensor([0, 40, 52], dtype=torch.int32)
    cu_k = torch.tensor([0, 40, 77], dtype=torch.int32)
    qi = torch.randn(52, groups, 16, generator=gen)
    ki = torch.randn(77, 16, generator=gen)
    indices = msattn.msa_select(qi, ki, block_size=block, topk=topk, cu_seqlens_q=cu_q,
                                cu_seqlens_k=cu_k, backend="reference")
    assert (indices < 0).any() and (indices >= 0).any()
    expected = brute_force_pairs(indices, cu_q, cu_k, block)
    assert train.attended_pairs(indices, cu_q, cu_k, block) == expected
    # hand-made rows: padding, a block after the query (masked), an own block cut causally
    # (blocks up to 9 reach past both sequences' keys)
    hand = torch.full((groups, 52, topk), -1, dtype=torch.int32)
    for g in range(groups):
        for t in range(52):
            count = int(torch.randint(0, topk + 1, (1,), generator=gen))
            hand[g, t, :count] = torch.randperm(10, generator=gen)[:count].to(torch.int32)
    assert train.attended_pairs(hand, cu_q, cu_k, block) == brute_force_pairs(hand, cu_q, cu_k, block)


def test_attended_pairs_dense_when_everything_selected():
    # topk >= number of blocks: every causal key, N (N + 1) / 2 per group
    n, block, groups = 100, 16, 3
    cu = torch.tensor([0, n], dtype=torch.int32)
    qi, ki = torch.randn(n, groups, 16), torch.randn(n, 16)
    indices = msattn.msa_select(qi, ki, block_size=block, topk=8, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                backend="reference")
    assert train.attended_pairs(indices, cu, cu, block) == groups * train.causal_pairs(n)


def test_flop_model():
    config = MSAConfig()  # H=64, G=4, D=128
    pairs = 4 * 1000  # 1000 (query, key) pairs per head
    assert train.sparse_bwd_flops(config, pairs) == 2 * (3 * 128 + 2 * 128) * 64 * 1000
    assert train.sparse_fwd_flops(config, pairs) == 2 * 2 * 128 * 64 * 1000


def test_train_cpu_suite_end_to_end(tmp_path, capsys, no_cuda):
    assert cli.main(["bench", "train-cpu", *TINY, "--out", str(tmp_path), "--no-plot"]) == 0
    (path,) = tmp_path.glob("*.json")
    assert path.name.startswith("train-cpu_cpu_")
    document = json.loads(path.read_text())
    assert {"gpu", "device", "date", "torch", "triton", "python", "command", "suite", "settings",
            "ceilings", "rows"} <= document.keys()
    assert document["suite"] == "train-cpu" and document["settings"]["config"]["topk"] == 3
    rows = document["rows"]
    assert [row["seq_len"] for row in rows] == [256, 512]
    config = MSAConfig(num_heads=4, num_kv_heads=2, num_index_heads=2, head_dim=16, index_dim=16,
                       block_size=32, topk=3)
    for row in rows:
        assert ROW_KEYS <= row.keys()
        assert row["op"] == "train-cpu" and row["msa_path"] == "reference"
        stages = [row[f"{s}_ms"] for s in train.MSA_STAGES]
        assert all(ms > 0 for ms in stages)
        assert sum(stages) == pytest.approx(row["msa_ms"], rel=0.5)
        assert row["dense_status"] == "measured" and row["dense_backend"] == "flash"
        assert row["speedup"] == pytest.approx(row["dense_ms"] / row["msa_ms"])
        assert row["dense_fwd_ms"] > 0 and row["dense_bwd_ms"] > 0
        n = row["seq_len"]
        # sparse: fewer pairs than dense causal, more than the own blocks alone
        assert n * 2 < row["sparse_pairs"] < 2 * train.causal_pairs(n)
        assert row["sparse_elements"] == row["sparse_pairs"] / 2
        assert row["sparse_bwd_flops"] == train.sparse_bwd_flops(config, row["sparse_pairs"])
        assert row["sparse_bwd_tflops"] == pytest.approx(
            row["sparse_bwd_flops"] / (row["attention_bwd_ms"] * 1e9))
        assert row["tokens_per_s"] == pytest.approx(n / (row["msa_ms"] / 1e3))
        assert row["peak_memory_gib"] is None and row["extra_memory_gib"] is None
        assert row["indexer_loss"] >= 0 and row["runs"]["msa"] >= 1
    output = capsys.readouterr()
    lines = output.out.splitlines()
    assert lines[2].split()[:3] == ["length", "key", "sparsity"]
    assert lines[4].split()[0] == "256" and lines[5].split()[0] == "512"
    assert f"results: {path}" in output.out
    assert "2/3 N=256: training step" in output.err


def test_train_dense_skipped(tmp_path, capsys, no_cuda):
    cli.main(["bench", "train-cpu", *TINY, "--lengths", "256", "--dense-max-len", "128",
              "--out", str(tmp_path), "--no-plot"])
    (path,) = tmp_path.glob("*.json")
    (row,) = json.loads(path.read_text())["rows"]
    assert row["dense_status"] == "skipped" and row["dense_ms"] is None and row["speedup"] is None
    assert "dense skipped" in capsys.readouterr().out


def test_train_dense_kernels(tmp_path, no_cuda):
    cli.main(["bench", "train-cpu", *TINY, "--lengths", "256", "--dense-kernels", "flash",
              "--out", str(tmp_path), "--no-plot"])
    (path,) = tmp_path.glob("*.json")
    (row,) = json.loads(path.read_text())["rows"]
    assert row["dense_status"] == "measured" and list(row["dense_candidates_ms"]) == ["flash"]
    assert json.loads(path.read_text())["settings"]["dense_kernels"] == ["flash"]
    with pytest.raises(ValueError, match="dense_kernels: none of"):
        dense.candidates(torch.device("cpu"), ("cudnn",))
    assert list(dense.candidates(torch.device("cuda"), ("cudnn",))) == ["cudnn"]


def test_train_needs_gpu(capsys, no_cuda):
    with pytest.raises(SystemExit):
        cli.main(["bench", "train"])
    assert "train-cpu" in capsys.readouterr().err


@pytest.mark.gpu
def test_train_suite_on_gpu(tmp_path, capsys):
    args = ["bench", "train", "--lengths", "4k,8k", "--warmup", "1", "--repeats", "3",
            "--time-budget", "1", "--dense-max-len", "4k", "--out", str(tmp_path), "--no-plot"]
    assert cli.main(args) == 0
    (path,) = tmp_path.glob("*.json")
    document = json.loads(path.read_text())
    assert document["gpu"] and document["ceilings"]["matmul_tflops"] > 0
    first, second = document["rows"]
    for row in (first, second):
        assert ROW_KEYS <= row.keys() and row["msa_path"] == "triton"
        assert row["peak_memory_gib"] > 0 and row["extra_memory_gib"] >= 0
        assert row["sparse_bwd_tflops"] > 0 and row["msa_ms"] > 0
        assert torch.isfinite(torch.tensor(row["indexer_loss"]))
    assert first["dense_status"] == "measured", first["dense_failures"]
    assert first["dense_backend"].split("+")[0] in ("cudnn", "flash")
    assert second["dense_status"] == "skipped"
    # 8K tokens, top-16 of 128: rows past 2048 keys select 16 of up to 64 blocks
    assert second["sparse_pairs"] < 4 * train.causal_pairs(8192)
    assert "bwd TFLOP/s" in capsys.readouterr().out
