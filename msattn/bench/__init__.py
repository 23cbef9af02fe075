"""Benchmarks of msattn: ``msattn bench`` (see :mod:`msattn.bench.cli`).

Modules: ``cli`` (command line and suites), ``prefill`` (the measurements), ``dense`` (the dense
baseline), ``timing`` (how a call is timed), ``metrics`` (cost model, selection statistics),
``report`` (table, JSON, plot).
"""
