"""Benchmarks: every path against a raw baseline measured in the same run (``ramdiscard bench``)."""
