"""The sections of ``benchmarks/bench_perf.py``, one module each, and the helpers they share (``common``).

Each section module has its ``bench_*`` function (the measurement, returning its numbers) and its
``run_*(args)`` (the command line's runner: reads its options, prints one line, returns the numbers).
``bench_perf.py`` puts ``benchmarks/`` on ``sys.path`` and imports this package as ``perf``.
"""
