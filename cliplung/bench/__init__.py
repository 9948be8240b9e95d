"""Benchmarks behind `cliplung bench`: model, ingest, train, tune, predict."""
