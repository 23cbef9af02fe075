"""Host helpers of msattn.ops.utils against Triton's own."""

import triton

from msattn.ops import utils
from msattn.ops.utils import cdiv, next_power_of_2


def test_cdiv_and_next_power_of_2_equal_tritons():
    """The launchers' plain-Python ``cdiv`` and ``next_power_of_2`` (Triton's are constexpr
    functions, ~3 µs a call from Python) give Triton's results."""
    for n in list(range(0, 4100)) + [(1 << 31) - 1, 1 << 31, (1 << 40) + 1]:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
    for a in range(-40, 600):
        for b in (1, 2, 3, 7, 16, 64, 128, 1000):
            assert cdiv(a, b) == triton.cdiv(a, b), (a, b)


def test_tensor_atomics_reach_every_thread_from_triton_3_5(monkeypatch):
    for version, expected in (("3.4.0", False), ("3.5.0", True), ("3.6.0+git1a2b3c", True),
                              ("4.0.0", True), ("2.3.1", False)):
        monkeypatch.setattr(utils.triton, "__version__", version)
        assert utils.tensor_atomics_reach_every_thread() is expected, version
