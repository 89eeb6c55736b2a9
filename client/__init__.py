"""Flower ClientApp and the ``python -m client --site NAME`` entry point of a hospital."""

from .flower_env import keep_flower_offline

keep_flower_offline()  # before Flower is imported or started: it reads these then
