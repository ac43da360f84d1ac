"""Developer tools that are neither the service nor tests: the local stack and the benchmarks.

Run them from the repository root as modules (``python -m tools.stack``,
``python -m tools.bench.run``; the Makefile's stack, bench, profile and soak targets do). Not
shipped in the image or the wheel. The tests import the stack launcher and ``tools.kit``.
"""
