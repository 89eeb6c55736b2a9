"""Flower ClientApp and the ``python -m client --site NAME`` entry point of a hospital."""
