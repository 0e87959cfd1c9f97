"""Benchmarks. Each module measures Tether against a baseline run on the same
machine in the same run, and prints ratios: absolute numbers from one machine
mean little on another. Not part of the test suite."""
