"""Shared inputs and checks for the Triton kernel tests (interpreter on CPU, real GPU on CUDA)."""

from __future__ import annotations

import torch

from msattn import reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def cu_seqlens(lengths, device=DEVICE) -> torch.Tensor:
    out = [0]
    for length in lengths:
        out.append(out[-1] + length)
    return torch.tensor(out, dtype=torch.int32, device=device)


def random_tensor(shape, dtype, *, integer=False, generator=None, device=DEVICE) -> torch.Tensor:
    """Random normal values, or small integers (exact dot products, many exact ties)."""
    if integer:
        values = torch.randint(-2, 3, shape, generator=generator)
    else:
        values = torch.randn(shape, generator=generator)
    return values.to(dtype).to(device)


def index_inputs(lens_q, lens_k, groups, index_dim, dtype, *, integer=False, seed=0):
    generator = torch.Generator().manual_seed(seed)
    cu_q, cu_k = cu_seqlens(lens_q), cu_seqlens(lens_k)
    qi = random_tensor((sum(lens_q), groups, index_dim), dtype, integer=integer, generator=generator)
    ki = random_tensor((sum(lens_k), index_dim), dtype, integer=integer, generator=generator)
    return qi, ki, cu_q, cu_k


def assert_selection_matches(out, expected, qi, ki, cu_q, cu_k, *, block_size, rel_tol=0.0,
                             key_error=None):
    """Selections equal as sets per row, with the output format of the reference.

    With ``rel_tol > 0`` a row may differ only where the swapped blocks' float32 scores are within
    ``rel_tol`` of each other (rounding-order near-ties of random data). ``key_error [total_k, Di]``
    (a bound on ``|ki - ki'|`` when ``out`` was selected on other keys ``ki'``, e.g. quantised ones)
    widens that by twice the swapped blocks' largest score error it allows.
    """
    assert out.shape == expected.shape and out.dtype == torch.int32
    # Same number of valid entries and -1 padding after them.
    assert torch.equal(out == -1, expected == -1)
    # The own block is the last valid entry.
    num_valid = (out >= 0).sum(-1)
    last = out.gather(-1, (num_valid - 1).clamp_min(0).unsqueeze(-1).long()).squeeze(-1)
    assert torch.equal(last, expected.gather(-1, (num_valid - 1).clamp_min(0).unsqueeze(-1).long()).squeeze(-1))
    differs = (out.sort(-1).values != expected.sort(-1).values).any(-1)
    if not differs.any():
        return
    assert rel_tol > 0 or key_error is not None, \
        f"{int(differs.sum())} rows select other blocks, e.g. {differs.nonzero()[:3].tolist()}"
    seq_of_row = torch.searchsorted(cu_q[1:], torch.arange(qi.shape[0], device=cu_q.device), right=True)
    for group, row in differs.nonzero().tolist():
        b = int(seq_of_row[row])
        q_start, k_start, k_end = int(cu_q[b]), int(cu_k[b]), int(cu_k[b + 1])
        position = (k_end - k_start) - (int(cu_q[b + 1]) - q_start) + (row - q_start)
        query, where = qi[row:row + 1, group:group + 1], torch.tensor([position], device=qi.device)
        scores = reference.block_scores(query, ki[k_start:k_end], where, block_size)[0, 0]
        mine, theirs = set(out[group, row].tolist()), set(expected[group, row].tolist())
        swapped = torch.tensor(sorted((mine ^ theirs) - {-1}), device=scores.device)
        spread = scores[swapped].max() - scores[swapped].min()
        allowed = rel_tol * scores[swapped].abs().max()
        if key_error is not None:  # |u - u'| <= max over the block of |qi| . key_error * Di**-0.5
            errors = reference.block_scores(query.abs(), key_error[k_start:k_end], where, block_size)
            allowed = allowed + 2 * errors[0, 0, swapped].max()
        assert spread <= allowed, (group, row, mine, theirs)


def paginate(contiguous: torch.Tensor, cu_seqlens_k: torch.Tensor, page_size: int, *,
             generator: torch.Generator, spare_pages: int = 3, fill=float("nan")):
    """Scatter each sequence of ``contiguous [total_k, ...]`` into pages of a cache in a random
    physical order. Returns ``(cache [num_pages, page_size, ...], block_table [B, max_pages])``;
    unused slots hold ``fill`` and unused table entries ``-1``."""
    lengths = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).tolist()
    pages_of = [-(-length // page_size) for length in lengths]
    num_pages = sum(pages_of) + spare_pages
    order = torch.randperm(num_pages, generator=generator).tolist()
    cache = torch.full((num_pages, page_size, *contiguous.shape[1:]), fill, dtype=contiguous.dtype,
                       device=contiguous.device)
    table = torch.full((len(lengths), max(pages_of, default=0) + 2), -1, dtype=torch.int32)
    start = 0
    for b, length in enumerate(lengths):
        for j in range(pages_of[b]):
            page = order.pop()
            table[b, j] = page
            chunk = contiguous[start + j * page_size:start + min(length, (j + 1) * page_size)]
            cache[page, :chunk.shape[0]] = chunk
        start += length
    return cache, table.to(contiguous.device)
