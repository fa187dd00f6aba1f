"""Benchmarks: ``python -m benchmarks [NAME…]`` runs them, prints tables and writes JSON."""
