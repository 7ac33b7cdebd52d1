"""Benchmarks (not tests): `make bench`. Each prints numbers next to a baseline from the same run."""
