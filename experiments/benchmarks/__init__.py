"""Benchmark modules, one per family: ``run() -> list[dict]``."""
