"""MrPrism-FL core: model, fusion, losses, metrics, data and the training step.

This package never imports Flower; ``client``, ``server`` and ``simulation`` build on it.
"""

__version__ = "0.1.0"
