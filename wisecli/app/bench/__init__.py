"""Benchmarks: speed, memory and inference overhead (``wise bench``).

The plain full-forward reference loop lives here, not in the editing path: it
exists only to measure the fast path against and to test that both agree.
"""
