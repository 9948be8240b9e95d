"""Training: :func:`cliplung.train.trainer.train` (the driver side, the one entry point of every
training run), :mod:`cliplung.train.loop` (what each Ray Train worker runs), :mod:`~.metrics`
(classification metrics and the names the loop reports) and :mod:`~.prometheus` (the exporter).

Nothing is imported here: :mod:`cliplung.config` reads the metric names from
:mod:`cliplung.train.metrics`, and importing this package must not pull in Ray or DeepSpeed.
"""
