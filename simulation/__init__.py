"""Simulated federations: virtual sites from public (or synthetic) data, the same ServerApp and
ClientApp in Flower's simulation engine, an experiment grid and a report."""
