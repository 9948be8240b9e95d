"""Benchmarks behind `cliplung bench`: model, ingest, train, tune, predict."""

GPU_SECTIONS = ("train_step", "text_path", "sync_debug", "predict", "data_path", "train_step_compiled")
"""The sections of ``cliplung bench gpu`` (:mod:`cliplung.bench.gpu`), in the order they run; each can be
skipped with ``--skip``. ``train_step_compiled`` runs on a GPU only."""
