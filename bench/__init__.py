"""The side-by-side benchmark: `python -m bench.run` (see bench/README.md)."""
