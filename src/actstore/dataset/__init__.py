"""Corpus capture: activations over a whole dataset, in batches, unit by unit, resumable.

- :mod:`~actstore.dataset.inputs`: reading JSONL, Parquet, text and saved datasets
- :mod:`~actstore.dataset.settings`: the capture's settings and the positions kept
- :mod:`~actstore.dataset.tokens`: rows to token ids
- :mod:`~actstore.dataset.batches`: left-padded batched forward passes, kept rows per batch
- :mod:`~actstore.dataset.units`: one unit written and committed as one run
- :mod:`~actstore.dataset.capture`: the whole corpus, with resume
- :mod:`~actstore.dataset.status`: done / pending / orphaned units; the ``ls`` rows
- :mod:`~actstore.dataset.cluster`: one dask task per unit
"""

from __future__ import annotations

from actstore.dataset.capture import DatasetResult, capture_dataset
from actstore.dataset.status import DatasetStatus, dataset_status

__all__ = ["DatasetResult", "DatasetStatus", "capture_dataset", "dataset_status"]
