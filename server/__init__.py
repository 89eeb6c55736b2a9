"""Flower ServerApp: aggregates the shared MrPrism weights, checkpoints, logs metrics."""
