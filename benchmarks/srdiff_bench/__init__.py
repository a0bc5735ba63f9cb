"""srdiff benchmarks: pytest-benchmark suites (bench_*.py), the runner and the report."""
