"""Benchmarks: scripts that measure and write JSON (never timed assertions in tests)."""
