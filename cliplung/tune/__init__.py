"""Hyperparameter search over whole training runs: Ray Tune + Optuna (TPE) + ASHA.

See :mod:`cliplung.tune.search` for the search itself and :mod:`cliplung.tune.cli` for the
``cliplung tune`` command.
"""
