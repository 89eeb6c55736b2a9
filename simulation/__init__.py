"""Simulated federations: virtual sites from public (or synthetic) data, the same ServerApp and
ClientApp in Flower's simulation engine, an experiment grid and a report."""

from client.flower_env import keep_flower_offline

keep_flower_offline()  # before Flower is imported or started: it reads these then
