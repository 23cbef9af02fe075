"""The KV-outer Triton sparse attention against the exact reference."""

import math
from dataclasses import replace

import pytest
import torch

import msattn
from msattn import reference
from msattn.ops.selection_csr import build_block_csr, csr_layout
from msattn.ops.sparse_attention import launch_config, sparse_attention
from tests.kernel_cases import DEVICE, cu_seqlens, index_inputs, random_tensor

# lens_q, lens_k, heads, groups, head_dim, block_size, topk, dtype, chunk_rows
CASES = [
    ([100], [100], 4, 2, 32, 16, 3, torch.float32, None),
    ([70, 130, 0], [200, 130, 9], 6, 2, 16, 16, 4, torch.float32, 50),  # varlen, group 3, chunks
    ([64], [300], 12, 2, 64, 32, 4, torch.float32, None),  # T < S, group 6
    ([40], [170], 3, 3, 32, 16, 2, torch.bfloat16, None),  # group 1
    ([50], [120], 16, 1, 16, 16, 3, torch.float16, None),  # group 16
    ([150], [300], 2, 1, 128, 128, 2, torch.float32, None),  # D = 128, partial block
    ([20], [600], 2, 1, 16, 256, 2, torch.float32, None),  # 256 = two key tiles
    ([9, 5], [9, 40], 4, 4, 16, 16, 4, torch.float32, 3),  # shorter than a block
]


def _inputs(lens_q, lens_k, heads, groups, head_dim, block_size, topk, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q = random_tensor((sum(lens_q), heads, head_dim), dtype, generator=generator)
    k = random_tensor((sum(lens_k), groups, head_dim), dtype, generator=generator)
    v = random_tensor((sum(lens_k), groups, head_dim), dtype, generator=generator)
    qi, ki, cu_q, cu_k = index_inputs(lens_q, lens_k, groups, 16, torch.float32, seed=seed + 1)
    indices = reference.select_blocks(qi, ki, cu_q, cu_k, block_size=block_size, topk=topk,
                                      init_blocks=0, local_blocks=1)
    return q, k, v, indices, cu_q, cu_k


def _poisoned(q):
    o = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:2], float("nan"), dtype=torch.float32, device=q.device)
    return o, lse


def _check(o, lse, expected_o, expected_lse):
    tol = 1e-5 if o.dtype == torch.float32 else 2e-2
    error = (o.float() - expected_o.float()).norm() / expected_o.float().norm()
    assert not o.isnan().any() and error < tol, float(error)
    finite = torch.isfinite(expected_lse)
    assert torch.equal(finite, torch.isfinite(lse))
    assert (lse[finite] - expected_lse[finite]).abs().max() < 1e-3


@pytest.mark.parametrize("merge", [False, True], ids=["combine-kernel", "merged-in-block-kernel"])
@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_sparse_attention_matches_reference(case, merge):
    """Both ways of merging the partials (``AttentionConfig.merge``)."""
    lens_q, lens_k, heads, groups, head_dim, block_size, topk, dtype, chunk_rows = case
    q, k, v, indices, cu_q, cu_k = _inputs(lens_q, lens_k, heads, groups, head_dim, block_size, topk, dtype)
    scale = head_dim ** -0.5
    expected_o, expected_lse = reference.sparse_attention(q, k, v, indices, cu_q, cu_k,
                                                          block_size=block_size, softmax_scale=scale)
    o, lse = sparse_attention(q, k, v, indices, cu_q, cu_k, block_size=block_size,
                              softmax_scale=scale, chunk_rows=chunk_rows, out=_poisoned(q),
                              config=replace(launch_config(q), merge=merge))
    _check(o, lse, expected_o, expected_lse)


@pytest.mark.parametrize("case", [1, 4], ids=lambda i: f"case{i}")
def test_both_merges_give_the_same_bits(case):
    """The block kernel's merge and the combine kernel run the same merge on the same partials."""
    lens_q, lens_k, heads, groups, head_dim, block_size, topk, dtype, chunk_rows = CASES[case]
    q, k, v, indices, cu_q, cu_k = _inputs(lens_q, lens_k, heads, groups, head_dim, block_size, topk, dtype)
    combined, merged = (sparse_attention(q, k, v, indices, cu_q, cu_k, block_size=block_size,
                                         softmax_scale=0.3, chunk_rows=chunk_rows,
                                         out=_poisoned(q),
                                         config=replace(launch_config(q), merge=merge))
                        for merge in (False, True))
    assert torch.equal(combined[0], merged[0]) and torch.equal(combined[1], merged[1])


@pytest.mark.parametrize("merge", [False, True], ids=["combine-kernel", "merged-in-block-kernel"])
def test_paged_kv_in_shuffled_pages(merge):
    """K/V as pages of a pool in random order (``block_table``, ``seq_lens``), chunks of rows
    (the merge counters are reused), varlen with T < S: the contiguous reference's result."""
    lens_q, lens_k, block_size = [30, 7, 50], [100, 40, 50], 16
    q, k, v, indices, cu_q, cu_k = _inputs(lens_q, lens_k, 6, 2, 32, block_size, 3, torch.float32, seed=7)
    pages = [-(-n // block_size) for n in lens_k]
    generator = torch.Generator().manual_seed(8)
    pool = torch.randperm(sum(pages) + 3, generator=generator).to(q.device)  # 3 unused pages
    table = torch.full((len(lens_k), max(pages)), -1, dtype=torch.int32, device=q.device)
    k_pages = torch.full((pool.numel(), block_size, 2, 32), float("nan"), device=q.device)
    v_pages = torch.full_like(k_pages, float("nan"))
    used = 0
    for seq, (start, n) in enumerate(zip(cu_k[:-1].tolist(), lens_k)):
        for page in range(pages[seq]):
            slot = int(pool[used])
            used += 1
            table[seq, page] = slot
            keys = slice(start + page * block_size, start + min(n, (page + 1) * block_size))
            count = keys.stop - keys.start
            k_pages[slot, :count], v_pages[slot, :count] = k[keys], v[keys]
    expected = reference.sparse_attention(q, k, v, indices, cu_q, cu_k, block_size=block_size,
                                          softmax_scale=0.2)
    o, lse = sparse_attention(q, k_pages, v_pages, indices, cu_q, None, block_size=block_size,
                              softmax_scale=0.2, chunk_rows=25, out=_poisoned(q),
                              block_table=table, seq_lens=torch.tensor(lens_k, dtype=torch.int32, device=q.device),
                              config=replace(launch_config(q), merge=merge))
    _check(o, lse, *expected)


@pytest.mark.parametrize("merge", [False, True], ids=["combine-kernel", "merged-in-block-kernel"])
@pytest.mark.parametrize("budget_rows", [1, 7])
def test_partials_in_unwritten_output_rows(monkeypatch, budget_rows, merge):
    """With a small partial buffer, early chunks keep their partials in the output rows after
    them (not written yet), the last rows use the buffer; the result is unchanged."""
    from msattn.ops import sparse_attention as module

    lens = [150, 90]
    q, k, v, indices, cu_q, cu_k = _inputs(lens, lens, 4, 2, 16, 16, 4, torch.float32, seed=5)
    per_row = 4 * 4 * (16 * 4 + 4)
    monkeypatch.setattr(module, "PARTIAL_BUDGET_BYTES", budget_rows * per_row)
    workspace = module._Workspace(_poisoned(q)[0], 4, None)
    chunks = [(start, end, partial_o.data_ptr()) for start, end, partial_o, _ in workspace.chunks()]
    assert chunks[0][1] - chunks[0][0] > budget_rows and chunks[-1][1] == q.shape[0]
    assert any(ptr == workspace.buffer[0].data_ptr() for _, _, ptr in chunks)
    # the buffer's chunks: as few as the buffer allows, of equal size (one row apart at most)
    buffered = [end - start for start, end, ptr in chunks if ptr == workspace.buffer[0].data_ptr()]
    assert len(buffered) == -(-sum(buffered) // budget_rows)
    assert max(buffered) <= budget_rows and max(buffered) - min(buffered) <= 1
    expected = reference.sparse_attention(q, k, v, indices, cu_q, cu_k, block_size=16,
                                          softmax_scale=0.25)
    o, lse = sparse_attention(q, k, v, indices, cu_q, cu_k, block_size=16, softmax_scale=0.25,
                              out=_poisoned(q), config=replace(launch_config(q), merge=merge))
    _check(o, lse, *expected)


@pytest.mark.parametrize("merge", [False, True], ids=["combine-kernel", "merged-in-block-kernel"])
def test_ignores_padding_and_blocks_after_the_query(merge):
    """User indices: -1 entries, blocks past the query and rows with nothing visible (which
    the merging block kernel writes in programs of their own)."""
    q, k, v, _, cu_q, cu_k = _inputs([40], [40], 2, 1, 16, 16, 2, torch.float32)
    indices = torch.full((1, 40, 3), -1, dtype=torch.int32, device=q.device)
    indices[0, 20:, 0] = 2  # block 2 starts at key 32: visible from row 32 on only
    indices[0, 20:, 1] = 0
    indices[0, 30, 1] = -1  # row 30 sees nothing
    indices[0, 25, 2] = 1 << 28  # far past the query: x 16 keys wraps int32 to 0
    expected = reference.sparse_attention(q, k, v, indices, cu_q, cu_k, block_size=16, softmax_scale=0.25)
    o, lse = sparse_attention(q, k, v, indices, cu_q, cu_k, block_size=16, softmax_scale=0.25,
                              out=_poisoned(q), config=replace(launch_config(q), merge=merge))
    _check(o, lse, *expected)
    assert torch.equal(o[:20], torch.zeros_like(o[:20])) and (lse[:20] == -math.inf).all()


def test_csr_lists_every_visible_entry_once():
    q, k, v, indices, cu_q, cu_k = _inputs([30, 50], [60, 50], 4, 2, 16, 16, 3, torch.float32)
    csr = build_block_csr(indices, cu_q, cu_k, block_size=16, total_k=110, row_start=10,
                          row_end=80, group_size=2, block_m=16,
                          tiles_per_program=2)
    num_valid = int(csr.bucket_start[-1])
    entries = csr.entries[:num_valid].long()
    assert entries.unique().numel() == num_valid
    group, row, slot = entries // (70 * 3), (entries // 3) % 70, entries % 3
    chosen = indices[group, 10 + row, slot].long()
    assert (chosen >= 0).all() and (chosen * 16 <= csr.row_position[row].long()).all()
    visible = (indices[:, 10:80] >= 0) & (indices[:, 10:80].long() * 16 <= csr.row_position[None, :, None].long())
    assert int(visible.sum()) == num_valid


def _csr_oracle(indices, cu_q, cu_k, *, block_size, row_start, row_end, group_size,
                rows_per_program, block_table=None):
    """The CSR of rows [row_start, row_end) built entry by entry in Python (BlockCSR's
    definition): ``(entries, bucket_start, program_start, program_bucket, row_position,
    block_key_start, block_position, block_num_keys)`` as lists (program_bucket for the programs
    that exist)."""
    num_groups, _, topk = indices.shape
    cu_q, cu_k = cu_q.tolist(), cu_k.tolist()
    batch = len(cu_q) - 1
    len_q = [cu_q[b + 1] - cu_q[b] for b in range(batch)]
    len_k = [cu_k[b + 1] - cu_k[b] for b in range(batch)]
    if block_table is None:
        blocks_of = [-(-n // block_size) for n in len_k]
        num_blocks = cu_k[-1] // block_size + batch
    else:
        blocks_of = [block_table.shape[1]] * batch
        num_blocks = batch * block_table.shape[1]
    first_block = [sum(blocks_of[:b]) for b in range(batch)]
    rows = row_end - row_start
    seq = [max(b for b in range(batch) if cu_q[b] <= token) for token in range(row_start, row_end)]
    position = [token - cu_q[b] + len_k[b] - len_q[b]
                for token, b in zip(range(row_start, row_end), seq)]
    buckets = [[] for _ in range(num_groups * num_blocks)]
    chosen = indices.tolist()
    for g in range(num_groups):
        for r in range(rows):
            for slot in range(topk):
                block = chosen[g][row_start + r][slot]
                if block >= 0 and block * block_size <= position[r]:
                    buckets[g * num_blocks + first_block[seq[r]] + block].append(
                        (g * rows + r) * topk + slot)
    entries = [e for bucket in buckets for e in bucket]
    bucket_start, program_start, program_bucket = [0], [0], []
    for b, bucket in enumerate(buckets):
        bucket_start.append(bucket_start[-1] + len(bucket))
        programs = -(-len(bucket) * group_size // rows_per_program)
        program_start.append(program_start[-1] + programs)
        program_bucket += [b] * programs
    block_key_start, block_position, block_num_keys = [], [], []
    for global_block in range(num_blocks):
        owners = [b for b in range(batch) if first_block[b] <= global_block]
        b = max(owners)
        local = global_block - first_block[b]
        keys = max(0, min(block_size, len_k[b] - local * block_size))
        if global_block >= sum(blocks_of):
            keys = 0
        block_num_keys.append(keys)
        block_position.append(local * block_size)
        if block_table is None:
            block_key_start.append(cu_k[b] + local * block_size)
        else:
            block_key_start.append(int(block_table[b, local]) if keys else 0)
    return (entries, bucket_start, program_start, program_bucket, position, block_key_start,
            block_position, block_num_keys)


# (lens_q, lens_k): two sequences; then seven, with an empty query run, keys in exact blocks, a
# one-key sequence and a 0-query 0-key one (the layout kernel's binary searches over the batch).
CSR_BATCHES = [([30, 50], [60, 50]), ([5, 0, 17, 1, 9, 0, 30], [20, 16, 17, 1, 64, 0, 33])]


@pytest.mark.parametrize("stable", [True, False])
@pytest.mark.parametrize("lens", range(len(CSR_BATCHES)))
@pytest.mark.parametrize("paged", [False, True])
def test_csr_matches_its_definition(paged, lens, stable, monkeypatch):
    """build_block_csr against the CSR built entry by entry (contiguous and paged keys, chunks
    of rows, invisible and -1 entries, indices whose slots are not contiguous), and a layout
    shared by the chunks gives the same CSR as a fresh one. The counting sort (``stable``
    False) may order a bucket's entries differently: compared as sets per bucket. Every buffer
    is poisoned when allocated."""
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: empty(*a, **k).fill_(-7))
    lens_q, lens_k = CSR_BATCHES[lens]
    total_q, total_k = sum(lens_q), sum(lens_k)
    q, k, v, indices, cu_q, cu_k = _inputs(lens_q, lens_k, 4, 2, 16, 16, 3, torch.float32)
    indices = indices.clone()
    if lens == 0:
        indices[1, 3:9, 0] = 3  # block 3 starts at key 48: invisible from rows at positions < 48
        indices[0, 40:44, 2] = -1
    strided = indices.permute(0, 2, 1).contiguous().permute(0, 2, 1)  # slot stride != 1
    block_table = seq_lens = None
    keys = cu_k
    if paged:  # pages of the sequences in a random order, the table padded
        max_pages = max(-(-n // 16) for n in lens_k) + 1
        pages = torch.randperm(len(lens_k) * max_pages,
                               generator=torch.Generator().manual_seed(3)).to(torch.int32)
        block_table = pages.view(len(lens_k), max_pages).to(DEVICE)
        seq_lens, keys = torch.diff(cu_k).to(torch.int32), None
    layout = csr_layout(cu_q, keys, total_q=total_q, num_groups=2, block_size=16,
                        total_k=total_k, block_table=block_table, seq_lens=seq_lens)
    for row_start, row_end in ((0, 25), (25, total_q), (7, 7)):
        args = dict(block_size=16, total_k=total_k, row_start=row_start, row_end=row_end,
                    group_size=2, block_m=16, tiles_per_program=2, block_table=block_table,
                    seq_lens=seq_lens, stable=stable)
        csr = build_block_csr(strided, cu_q, keys, **args)
        (entries, bucket_start, program_start, program_bucket, position, key_start,
         block_position, num_keys) = _csr_oracle(indices, cu_q, cu_k, block_size=16,
                                                 row_start=row_start, row_end=row_end,
                                                 group_size=2, rows_per_program=32,
                                                 block_table=block_table)
        assert csr.bucket_start.tolist() == bucket_start
        if stable:
            assert csr.entries[:len(entries)].tolist() == entries
        else:  # the same entries in each bucket, in some order
            got = csr.entries[:len(entries)].tolist()
            for first, end in zip(bucket_start, bucket_start[1:]):
                assert sorted(got[first:end]) == entries[first:end]
        assert csr.program_start.tolist() == program_start
        assert csr.program_bucket[:len(program_bucket)].tolist() == program_bucket
        assert csr.program_bucket.numel() == csr.max_programs + 1 >= len(program_bucket)
        assert (csr.program_bucket[len(program_bucket):] == len(bucket_start) - 2).all()
        assert not layout.bucket_count.any()  # the counters are zero again
        assert csr.row_position.tolist() == position
        assert csr.block_key_start.tolist() == key_start
        assert csr.block_position.tolist() == block_position
        assert csr.block_num_keys.tolist() == num_keys
        assert all(t.dtype == torch.int32 for t in (csr.entries, csr.bucket_start,
                                                    csr.program_start, csr.program_bucket))
        shared = build_block_csr(indices, cu_q, keys, layout=layout, **args)
        for name in ("entries" if stable else "bucket_start", "bucket_start", "program_start", "program_bucket",
                     "block_key_start", "block_position", "block_num_keys", "row_position"):
            assert torch.equal(getattr(csr, name), getattr(shared, name)), name
    with pytest.raises(ValueError, match="layout was built for another call"):
        build_block_csr(indices[:1], cu_q, keys, layout=layout, **args)


def test_msa_attention_triton_equals_reference_batched():
    generator = torch.Generator().manual_seed(11)
    shape = dict(B=2, T=48, S=80, H=6, G=2, D=32, Di=16)
    q = torch.randn(2, 48, 6, 32, generator=generator).to(DEVICE)
    k = torch.randn(2, 80, 2, 32, generator=generator).to(DEVICE)
    v = torch.randn(2, 80, 2, 32, generator=generator).to(DEVICE)
    qi = torch.randn(2, 48, 2, 16, generator=generator).to(DEVICE)
    ki = torch.randn(2, 80, 16, generator=generator).to(DEVICE)
    kwargs = dict(block_size=16, topk=3, init_blocks=1, local_blocks=1, return_lse=True)
    o, lse = msattn.msa_attention(q, k, v, qi, ki, backend="triton", **kwargs)
    expected_o, expected_lse = msattn.msa_attention(q, k, v, qi, ki, backend="reference", **kwargs)
    assert o.shape == (shape["B"], shape["T"], shape["H"], shape["D"])
    _check(o, lse, expected_o, expected_lse)


@pytest.mark.gpu
@pytest.mark.parametrize("lens_q,lens_k", [([8192], [8192]), ([3000, 1, 20000], [9000, 50000, 20000]),
                                           ([131072], [131072])])
def test_gpu_m3_shape(lens_q, lens_k):
    """M3 shape (64 heads, 4 KV heads, D = 128, block 128, top-16) in bf16, both merges: the
    block kernel's merge reads the partials that concurrent programs store (atomics and
    barriers), so it must give the combine kernel's bits (the same merge of the same partials)."""
    q, k, v, indices, cu_q, cu_k = _inputs(lens_q, lens_k, 64, 4, 128, 128, 16, torch.bfloat16)
    expected = reference.sparse_attention(q, k, v, indices, cu_q, cu_k, block_size=128,
                                          softmax_scale=128 ** -0.5)
    results = []
    for merge in (False, True):
        o, lse = sparse_attention(q, k, v, indices, cu_q, cu_k, block_size=128,
                                  softmax_scale=128 ** -0.5, out=_poisoned(q),
                                  config=replace(launch_config(q), merge=merge))
        _check(o, lse, *expected)
        results.append((o, lse))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert cu_seqlens(lens_q).equal(cu_q)


def test_output_does_not_depend_on_the_order_of_a_buckets_entries():
    """The forward's counting sort leaves a bucket's entries in the order its atomics ranked them
    (on a GPU, a different one each run). A row's output and LSE do not depend on the rows beside
    it in a tile: the same selection gives bit-identical results in repeated runs (tiles that mix
    the entries of many rows: a bucket holds up to a sequence's rows)."""
    q, k, v, indices, cu_q, cu_k = _inputs([120, 50], [200, 50], 8, 2, 32, 16, 4,
                                           torch.bfloat16 if DEVICE == "cuda" else torch.float32)
    runs = [sparse_attention(q, k, v, indices, cu_q, cu_k, block_size=16, softmax_scale=0.2,
                             out=_poisoned(q)) for _ in range(3)]
    for o, lse in runs[1:]:
        assert torch.equal(o, runs[0][0]) and torch.equal(lse, runs[0][1])
    _check(*runs[0], *reference.sparse_attention(q, k, v, indices, cu_q, cu_k, block_size=16,
                                                 softmax_scale=0.2))
