"""Benchmarks: scripts that measure and write JSON (never timed assertions in tests)."""

from client.flower_env import keep_flower_offline

keep_flower_offline()  # before Flower is imported or started: it reads these then
