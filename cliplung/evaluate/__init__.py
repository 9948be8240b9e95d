"""Evaluation, cross-validation and prediction of trained malignancy classifiers.

* :mod:`~cliplung.evaluate.evaluate`: score the held-out test fold with the EMA inference export,
  write ``metrics.json`` and a self-contained HTML report (``cliplung evaluate``).
* :mod:`~cliplung.evaluate.cv`: train and evaluate every fold, compare methods (``cliplung cv``,
  ``cliplung compare``).
* :mod:`~cliplung.evaluate.predict`: one nodule from a DICOM series, or a whole store with Ray Data
  (``cliplung predict``).
* :mod:`~cliplung.evaluate.report` (plots, HTML) and :mod:`~cliplung.evaluate.attention` (Grad-CAM).

Nothing here loads a text tower: every path goes through the inference export (image encoder +
head), :func:`cliplung.model.load_inference`.
"""
