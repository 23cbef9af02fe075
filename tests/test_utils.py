"""Host helpers of msattn.ops.utils against Triton's own."""

import triton

from msattn.ops.utils import cdiv, next_power_of_2


def test_cdiv_and_next_power_of_2_equal_tritons():
    """The launchers' plain-Python ``cdiv`` and ``next_power_of_2`` (Triton's are constexpr
    functions, ~3 µs a call from Python) give Triton's results."""
    for n in list(range(0, 4100)) + [(1 << 31) - 1, 1 << 31, (1 << 40) + 1]:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
    for a in range(-40, 600):
        for b in (1, 2, 3, 7, 16, 64, 128, 1000):
            assert cdiv(a, b) == triton.cdiv(a, b), (a, b)
