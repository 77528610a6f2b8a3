"""The emotion experiment's four tables against plain NumPy."""

from __future__ import annotations

from typing import Any

import dask
import numpy as np
import pytest

from actstore.query.tables import paper_tables

from .helpers import RESIDUAL, np_cos, raw, raw_stack
from .test_compare import CountingScheduler


def test_paper_tables(any_run: Any) -> None:
    run = any_run
    sched = CountingScheduler()
    with dask.config.set(scheduler=sched):
        t = paper_tables(run)
    assert sched.calls == 1  # both comparisons in one graph
    assert set(t) == {"intra_run_drift", "message_reference", "reference_source", "role_gap"}

    drift = t["intra_run_drift"].set_index("source")
    for s in RESIDUAL:
        x = raw(run, s)
        cos = np.array([np_cos(x[i, run.prompt_len - 1], x[i, -1]) for i in range(len(run.layers))])
        row = drift.loc[s]
        assert row["mean"] == pytest.approx(cos.mean()) and row["std"] == pytest.approx(cos.std())
        assert row["median"] == pytest.approx(np.median(cos)) and row["min"] == pytest.approx(cos.min())
        assert row["min_layer"] == run.layers[int(np.argmin(cos))]

    labels = run.reference_labels
    # cos[s][m, r, l]
    cos = {}
    for s in RESIDUAL:
        sn, rf = raw_stack(run, "snapshots", s), raw_stack(run, "references", s)
        cos[s] = np.array([[[np_cos(sn[m, la], rf[r, la]) for la in range(sn.shape[1])]
                            for r in range(len(rf))] for m in range(len(sn))])  # fmt: skip
    mr = t["message_reference"]
    expected = np.mean([cos[s].mean(axis=2) for s in RESIDUAL], axis=0)  # (M, R)
    np.testing.assert_allclose(mr[labels].to_numpy(), expected, rtol=1e-9)
    assert mr["best"].tolist() == [labels[i] for i in expected.argmax(axis=1)]
    assert mr["role"].tolist() == [s["role"] for s in run.snapshot_index]

    rs = t["reference_source"].set_index("reference")
    for s in RESIDUAL:
        np.testing.assert_allclose(rs.loc[labels, s].to_numpy(), cos[s].mean(axis=(0, 2)), rtol=1e-9)

    gap = t["role_gap"].set_index("source")
    roles = np.array([s["role"] for s in run.snapshot_index])
    for s in RESIDUAL:
        user, asst = cos[s][roles == "user"].mean(), cos[s][roles == "assistant"].mean()
        assert gap.loc[s, "user"] == pytest.approx(user) and gap.loc[s, "assistant"] == pytest.approx(asst)
        assert gap.loc[s, "gap"] == pytest.approx(user - asst)
