"""Hydra configuration: one YAML per site plus shared groups (``data/``, ``model/``).

This is a package so the YAML files ship with the wheel and Hydra finds them as
``pkg://site_configs`` however the project is installed.
"""
