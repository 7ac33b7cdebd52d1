"""Benchmarks (not tests): `make bench`. Each prints its numbers next to a baseline measured in the same run."""
