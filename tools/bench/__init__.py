"""Benchmarks: they print figures and are never run by pytest (``make bench``, ``make profile``,
``make soak``, ``python -m tools.bench.adversarial``)."""
