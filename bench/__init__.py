"""``loadout bench``: the load generator, the lock baseline comparison, reports.

See BENCHMARKS.md for the method and the figures measured with it.
"""
