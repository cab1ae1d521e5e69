"""Benchmarks of the pre-training project; each module runs with `python -m bench.<name>`."""
