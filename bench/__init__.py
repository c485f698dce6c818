"""Benchmarks (measurements printed beside a reference, never pass/fail). Each script runs from the repository
root as a module of this package: `python -m bench.<script> --help`."""
