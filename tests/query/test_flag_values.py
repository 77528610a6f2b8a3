"""CLI flags and selectors checked by the values they change (issue 12).

Each answer is compared with an independent computation: vectors and tokens read
straight from the Zarr arrays (``helpers.raw``, ``zarr.open_group``) and the metrics
written out in plain NumPy. Each test also checks that its data can tell a wrong answer
from the right one (e.g. top-k by x and by |x| differ somewhere, consecutive tokens
differ), so a flag that is ignored or a column shifted by one fails.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pandas as pd
import pytest
import zarr
from click.testing import CliRunner, Result

from actstore.cli import main
from actstore.errors import RunNotFoundError, SelectionError
from actstore.query.states import state_position, step_index, step_last_positions
from actstore.store.store import ActStore

from .helpers import np_jaccard, raw
from .synth import write_synthetic_run

FRAC = 0.1  # k = 20 of 200 dimensions: top-k by x and by |x| differ on most layers


@pytest.fixture(scope="module")
def store(tmp_path_factory: Any) -> ActStore:
    """Two float32 synthetic runs (float32: no ties at the top-k threshold)."""
    st = ActStore.open(tmp_path_factory.mktemp("flagvalues") / "store.zarr", create=True)
    for seed in range(2):
        write_synthetic_run(st, name=f"vals{seed}", seed=seed + 10, n_layers=4, prompt_len=10, n_steps=5,
                            width=200, n_snapshots=3, labels=("joy", "fear"), store_dtype="float32")  # fmt: skip
    return st


def _cli(store: ActStore, *args: str) -> Result:
    return CliRunner().invoke(main, [*args, "--store", store.location])


def _csv(res: Result) -> pd.DataFrame:
    assert res.exit_code == 0, res.output
    return pd.read_csv(io.StringIO(res.output))


def _zgroup(run: Any) -> zarr.Group:
    return zarr.open_group(store=run.group.store, path=run.group.path, mode="r")


# ---- query jaccard --magnitude --------------------------------------------------------
@pytest.mark.parametrize("magnitude", [False, True])
def test_jaccard_magnitude_flag_changes_values_as_numpy(store: ActStore, magnitude: bool) -> None:
    run = store.run("latest")
    flag = ["--magnitude"] if magnitude else []
    df = _csv(_cli(store, "query", "jaccard", "--frac", str(FRAC), *flag, "--format", "csv"))
    x = raw(run, "hidden_out")  # (L, T, W)
    a, b = state_position(run, "initial"), state_position(run, "final")
    assert (a, b) == (9, run.n_positions - 1)  # the last prompt token, the last position
    expected = [np_jaccard(x[i, a], x[i, b], FRAC, magnitude=magnitude) for i in range(len(run.layers))]
    other = [np_jaccard(x[i, a], x[i, b], FRAC, magnitude=not magnitude) for i in range(len(run.layers))]
    assert expected != other  # the data tells the two rankings apart
    assert df["layer"].tolist() == run.layers
    np.testing.assert_allclose(df["jaccard"].to_numpy(), expected, rtol=0, atol=1e-12)


def test_jaccard_magnitude_flag_between_runs(store: ActStore) -> None:
    runs = store.runs(["all"])
    xs = [raw(r, "hidden_out") for r in runs]
    pos = [state_position(r, "final") for r in runs]
    for magnitude in (False, True):
        flag = ["--magnitude"] if magnitude else []
        df = _csv(_cli(store, "query", "jaccard", "--runs", "all", "--compare", "runs",
                       "--frac", str(FRAC), *flag, "--format", "csv"))  # fmt: skip
        df = df[df["state"] == "final"].sort_values("layer")
        assert df["run_a"].unique().tolist() == [runs[0].id] and df["run_b"].unique().tolist() == [runs[1].id]
        expected = [np_jaccard(xs[0][i, pos[0]], xs[1][i, pos[1]], FRAC, magnitude) for i in range(4)]
        np.testing.assert_allclose(df["jaccard"].to_numpy(), expected, rtol=0, atol=1e-12)


# ---- query trajectory: tokens, values and positions per step -----------------------------
def test_trajectory_rows_equal_the_tokens_fed_and_values_stored(tiny: Any) -> None:
    run, tok = tiny.run, tiny.loaded.tokenizer
    g = _zgroup(run)
    token_ids = np.asarray(g["tokens"][...])
    prompt_len = int(g.attrs["run"]["prompt_len"])
    layer, neuron = run.layers[1], 3
    res = CliRunner().invoke(main, ["query", "trajectory", "--run", run.id, "--layer", str(layer), "--neuron",
                                    str(neuron), "--format", "csv", "--store", tiny.store.location])  # fmt: skip
    df = pd.read_csv(io.StringIO(res.output), keep_default_na=False)
    assert res.exit_code == 0, res.output
    n_steps = run.n_steps
    # step s's forward pass ends at position prompt_len - 1 + s, and that token was fed there
    positions = [prompt_len - 1 + s for s in range(n_steps)]
    fed = tok.convert_ids_to_tokens(token_ids[positions].tolist())
    assert any(a != b for a, b in zip(fed, fed[1:], strict=False))  # a shift by one shows
    assert df["step"].tolist() == list(range(n_steps))
    assert df["position"].tolist() == positions
    assert df["token"].tolist() == fed
    # the token each step generated is the one fed at the next step (the last: from metadata)
    generated = tok.convert_ids_to_tokens(g.attrs["run"]["generated_token_ids"])
    assert df["generated_token"].tolist() == generated
    assert generated[:-1] == fed[1:]
    x = raw(run, "hidden_out")[run.layers.index(layer)]
    np.testing.assert_allclose(df["value"].to_numpy(), x[positions, neuron], rtol=1e-6, atol=0)


def test_trajectory_over_positions_tokens(tiny: Any) -> None:
    from actstore.query import neuron_trajectory

    run, tok = tiny.run, tiny.loaded.tokenizer
    token_ids = np.asarray(_zgroup(run)["tokens"][...])
    df = neuron_trajectory(run, run.layers[0], 0, over="positions")
    assert df["position"].tolist() == list(range(len(token_ids)))
    assert df["token"].tolist() == tok.convert_ids_to_tokens(token_ids.tolist())
    steps = [0] * run.prompt_len + list(range(1, len(token_ids) - run.prompt_len + 1))
    assert df["step"].tolist() == steps


# ---- selectors: an ambiguous prefix, an index bound ---------------------------------------
@pytest.fixture(scope="module")
def prefix_store(tmp_path_factory: Any) -> ActStore:
    """Three runs whose ids share the prefix ``pfx`` (scenarios pfx_a, pfx_a, pfx_b)."""
    st = ActStore.open(tmp_path_factory.mktemp("prefix") / "store.zarr", create=True)
    for i, name in enumerate(("pfx_a", "pfx_a", "pfx_b")):
        write_synthetic_run(st, name=name, seed=i, n_layers=2, prompt_len=4, n_steps=3, width=8,
                            n_snapshots=2, labels=("joy", "fear"), store_dtype="float32")  # fmt: skip
    return st


def test_ambiguous_prefix_raises(prefix_store: ActStore) -> None:
    ids = prefix_store.run_ids()
    assert all(i.startswith("pfx") for i in ids) and len(set(ids)) == 3
    with pytest.raises(RunNotFoundError, match="matches 3 runs"):
        prefix_store.run("pfx")
    with pytest.raises(RunNotFoundError, match="matches 3 runs"):
        prefix_store.runs(["pfx"])
    res = _cli(prefix_store, "query", "cosine", "--runs", "pfx")
    assert res.exit_code == 2 and "matches 3 runs" in res.output, res.output
    res = _cli(prefix_store, "query", "trajectory", "--run", "pfx", "--layer", "0", "--neuron", "0")
    assert res.exit_code == 2 and "matches 3 runs" in res.output, res.output
    # an unambiguous prefix picks its one run; a scenario name picks all of its runs
    assert prefix_store.run(ids[2][:-2]).id == ids[2]
    assert prefix_store.resolve("pfx_a") == ids[:2]


def test_ambiguous_prefix_error_names_the_matches(prefix_store: ActStore) -> None:
    with pytest.raises(RunNotFoundError) as err:
        prefix_store.run("pfx")
    assert all(i in str(err.value) for i in prefix_store.run_ids())


def test_step_index_bounds(store: ActStore) -> None:
    run = store.run("latest")
    n = run.n_steps
    assert [step_index(run, i) for i in (0, n - 1, -1, -n)] == [0, n - 1, n - 1, 0]
    for bad in (n, n + 1, -n - 1):
        with pytest.raises(SelectionError, match=f"not {bad}"):
            step_index(run, bad)
    with pytest.raises(SelectionError):
        step_last_positions(run, [n])
    with pytest.raises(SelectionError):
        state_position(run, f"step:{n}")
    with pytest.raises(SelectionError):
        state_position(run, f"pos:{run.n_positions}")
    assert state_position(run, f"pos:{run.n_positions - 1}") == run.n_positions - 1
    res = _cli(store, "query", "cosine", "--compare", f"step:{n}:final")
    assert res.exit_code == 2 and f"not {n}" in res.output, res.output
    res = _cli(store, "query", "cosine", "--compare", f"snapshot:{len(run.snapshot_index)}:final")
    assert res.exit_code == 2, res.output


def test_step_states_read_their_own_positions(store: ActStore) -> None:
    """``step:N`` compares the last position of step N (not a neighbour, not step 0)."""
    run = store.run("latest")
    x = raw(run, "hidden_out")
    n = run.n_steps
    df = _csv(_cli(store, "query", "mae", "--compare", f"step:{n - 1}:step:0", "--format", "csv"))
    a, b = run.prompt_len - 1 + n - 1, run.prompt_len - 1
    expected = np.abs(x[:, a] - x[:, b]).mean(-1)
    np.testing.assert_allclose(df["mae"].to_numpy(), expected, rtol=1e-6)
