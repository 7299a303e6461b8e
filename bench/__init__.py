"""Benchmarks: each module measures side by side in one run and returns a markdown section."""
