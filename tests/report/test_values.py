"""The report's options and sentences checked by value (issue 12).

* ``actstore report --overlap-by value|magnitude``: the CSVs' ``overlap`` column equals a
  plain-NumPy top-1% Jaccard ranked by x or by |x|, and the two differ on this data.
* ``generated_a`` / ``generated_b`` are each run's own generated text (read from the run's
  Zarr attributes), and the two runs' texts differ.
* Every first-screen sentence names the layer / role / reference that NumPy picks from
  vectors read straight from the Zarr arrays (argmin drift layer, closer role, argmax
  separation layer, most common closest reference), with the numbers it prints.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from actstore.cli import main
from actstore.store.store import ActStore
from query.synth import edited_run_meta, raw_run_group, write_synthetic_run

from .helpers import SOURCES, cosine, run_group, stacked, vectors_at

RTOL, ATOL = 1e-6, 1e-9
FRAC = 0.01  # the report's top 1%


def np_overlap(a: np.ndarray, b: np.ndarray, magnitude: bool) -> np.ndarray:
    """Top-1% Jaccard per row, ranked by |x| or x; ties to the lower index (stable sort)."""
    k = max(1, int(a.shape[-1] * FRAC))
    out = []
    for x, y in zip(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]), strict=True):
        vx, vy = (np.abs(x), np.abs(y)) if magnitude else (x, y)
        sa = set(np.argsort(-vx, kind="stable")[:k].tolist())
        sb = set(np.argsort(-vy, kind="stable")[:k].tolist())
        out.append(len(sa & sb) / len(sa | sb))
    return np.asarray(out).reshape(a.shape[:-1])


def _position(group: Any, state: str) -> int:
    meta = group.attrs["run"]
    return int(meta["prompt_len"] - 1 if state == "initial" else meta["n_positions"] - 1)


def _report_folders(store: Any, tmp_path_factory: Any) -> dict[str, Path]:
    """The report CLI's output folder, once per --overlap-by."""
    out = {}
    for by in ("value", "magnitude"):
        d = tmp_path_factory.mktemp(f"overlap_{by}")
        res = CliRunner().invoke(main, ["report", "--store", str(store.location), "--out", str(d),
                                        "--overlap-by", by, "--quiet"])  # fmt: skip
        assert res.exit_code == 0, res.output
        out[by] = d
    return out


@pytest.fixture(scope="module")
def reports(two_run_store: Any, tmp_path_factory: Any) -> dict[str, Path]:
    return _report_folders(two_run_store, tmp_path_factory)


@pytest.fixture(scope="module")
def synth_reports(tmp_path_factory: Any) -> tuple[ActStore, dict[str, Path]]:
    """Two synthetic float32 runs, 300 wide (top 1% = 3 dimensions): wide enough that
    ranking by x and by |x| picks different dimensions between initial and final."""
    st = ActStore.open(tmp_path_factory.mktemp("synthrep") / "store.zarr", create=True)
    for seed in range(2):
        write_synthetic_run(st, name=f"rep{seed}", seed=seed, n_layers=4, prompt_len=10, n_steps=4, width=300,
                            n_snapshots=4, labels=("joy", "fear", "calm"), store_dtype="float32")  # fmt: skip
    return st, _report_folders(st, tmp_path_factory)


def _read(folder: Path, name: str) -> pd.DataFrame:
    return pd.read_csv(folder / name, keep_default_na=False)


# ---- --overlap-by -------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["tiny", "synth"])
def test_overlap_by_changes_intra_overlap_as_numpy(which: str, request: Any) -> None:
    if which == "tiny":
        store, folders = request.getfixturevalue("two_run_store"), request.getfixturevalue("reports")
    else:
        store, folders = request.getfixturevalue("synth_reports")
    differ = 0
    for by, magnitude in (("value", False), ("magnitude", True)):
        df = _read(folders[by], "intra_run_cosines.csv")
        for run_id in store.run_ids():
            g = run_group(store, run_id)
            for source in SOURCES:
                a = vectors_at(g, source, _position(g, "initial"))
                b = vectors_at(g, source, _position(g, "final"))
                got = df[(df["run"] == run_id) & (df["source"] == source)].sort_values("layer")
                assert got["layer"].tolist() == g.attrs["run"]["layers"]
                expected = np_overlap(a, b, magnitude)
                np.testing.assert_allclose(got["overlap"].to_numpy(float), expected, rtol=0, atol=1e-12)
                differ += int(not np.array_equal(expected, np_overlap(a, b, not magnitude)))
                np.testing.assert_allclose(got["cosine"].to_numpy(float), cosine(a, b), rtol=RTOL, atol=ATOL)
    if which == "synth":  # (tiny model: 64 wide, top 1% is one dimension, here the same either way)
        assert differ > 0  # x and |x| rank differently somewhere on this data


def test_overlap_by_changes_inter_overlap_as_numpy(two_run_store: Any, reports: dict[str, Path]) -> None:
    a_id, b_id = two_run_store.run_ids()
    ga, gb = run_group(two_run_store, a_id), run_group(two_run_store, b_id)
    differ = 0
    frames = {by: _read(reports[by], "comparison_cosines.csv") for by in reports}
    for by, magnitude in (("value", False), ("magnitude", True)):
        df = frames[by]
        assert set(zip(df["run_a"], df["run_b"], strict=True)) == {(a_id, b_id)}
        assert set(df["pair"]) == {f"{a_id}  vs  {b_id}"}  # Activation Lab's pair key: two spaces each side
        for state in ("initial", "final"):
            for source in SOURCES:
                a, b = (
                    vectors_at(ga, source, _position(ga, state)),
                    vectors_at(gb, source, _position(gb, state)),
                )
                got = df[(df["state"] == state) & (df["source"] == source)].sort_values("layer")
                expected = np_overlap(a, b, magnitude)
                np.testing.assert_allclose(got["overlap"].to_numpy(float), expected, rtol=0, atol=1e-12)
                differ += int(not np.array_equal(expected, np_overlap(a, b, not magnitude)))
    assert differ > 0
    assert not np.array_equal(frames["value"]["overlap"].to_numpy(float),
                              frames["magnitude"]["overlap"].to_numpy(float))  # fmt: skip
    # the summary's overlap columns follow the flag too
    for by in reports:
        s = _read(reports[by], "comparison_report.csv")
        per = frames[by].groupby(["state", "source"])["overlap"].mean()
        for row in s.itertuples():
            assert row.mean_overlap == pytest.approx(per[(row.state, row.source)], rel=RTOL, abs=ATOL)


# ---- generated_a / generated_b ------------------------------------------------------------
def _own_generated(group: Any, run_id: str) -> str:
    text = " ".join(str(group.attrs["run"]["generated_text"]).split())
    return text[:40] or run_id


def test_generated_columns_are_each_runs_own_text(two_run_store: Any, reports: dict[str, Path]) -> None:
    a_id, b_id = two_run_store.run_ids()
    own = {i: _own_generated(run_group(two_run_store, i), i) for i in (a_id, b_id)}
    assert own[a_id] != own[b_id]  # a swap shows
    for name in ("comparison_cosines.csv", "comparison_report.csv"):
        df = _read(reports["magnitude"], name)
        assert len(df) > 0
        assert set(df["generated_a"]) == {own[a_id]}, name
        assert set(df["generated_b"]) == {own[b_id]}, name
    intra = _read(reports["magnitude"], "intra_run_report.csv")
    for run_id in (a_id, b_id):
        full = " ".join(str(run_group(two_run_store, run_id).attrs["run"]["generated_text"]).split())
        assert set(intra[intra["run"] == run_id]["generated"]) == {full}


# ---- the first screen's sentences -----------------------------------------------------------
@pytest.fixture(scope="module")
def screen(two_run_store: Any) -> dict[str, Any]:
    from actstore.report.gather import gather
    from actstore.report.narrative import first_screen

    return first_screen(gather(two_run_store.runs(["all"])))


def _point(points: list[str], needle: str) -> str:
    found = [p for p in points if needle in p]
    assert len(found) == 1, (needle, points)
    return found[0]


def _svr_cosines(group: Any, source: str) -> np.ndarray:
    """(messages, references, layers) cosine of each snapshot with each reference."""
    s, r = stacked(group, "snapshots", source), stacked(group, "references", source)
    return cosine(s[:, None], r[None, :])


def test_first_screen_drift_sentence(
    two_run_store: Any, screen: dict[str, Any], reports: dict[str, Path]
) -> None:
    csv = _read(reports["magnitude"], "intra_run_cosines.csv")
    for entry in screen["runs"]:
        g = run_group(two_run_store, entry["id"])
        layers = g.attrs["run"]["layers"]
        a, b = (
            vectors_at(g, "hidden_out", _position(g, "initial")),
            vectors_at(g, "hidden_out", _position(g, "final")),
        )
        cos = cosine(a, b)
        sub = csv[(csv["run"] == entry["id"]) & (csv["source"] == "hidden_out")].sort_values("layer")
        np.testing.assert_allclose(sub["cosine"].to_numpy(float), cos, rtol=RTOL, atol=ATOL)
        assert cos.min() < cos.max()
        p = _point(entry["points"], "changes most at layer")
        m = re.search(
            r"\(hidden_out\) keeps a mean cosine of ([-\d.]+) .* changes most at layer (\d+) \(cosine ([-\d.]+)\)",
            p,
        )
        assert m, p
        assert int(m.group(2)) == layers[int(np.argmin(cos))]
        assert m.group(1) == f"{cos.mean():.2f}" and m.group(3) == f"{cos.min():.2f}"


def test_first_screen_role_sentence(two_run_store: Any, screen: dict[str, Any]) -> None:
    for entry in screen["runs"]:
        g = run_group(two_run_store, entry["id"])
        roles = [s["role"] for s in g.attrs["run"]["snapshots"]]
        cos = _svr_cosines(g, "hidden_out")  # (M, R, L)
        user = cos[[i for i, r in enumerate(roles) if r == "user"]].mean()
        assistant = cos[[i for i, r in enumerate(roles) if r == "assistant"]].mean()
        assert abs(user - assistant) > 1e-3  # the data has a closer role
        closer = "User" if user > assistant else "Assistant"
        p = _point(entry["points"], "turns sit closer to the references")
        m = re.fullmatch(r"(\w+) turns sit closer to the references \(hidden_out: user ([-\d.]+) vs "
                         r"assistant ([-\d.]+) mean cosine over references and layers\)\.", p)  # fmt: skip
        assert m, p
        assert m.group(1) == closer
        assert (m.group(2), m.group(3)) == (f"{user:.3f}", f"{assistant:.3f}")


def test_first_screen_best_layer_sentence(two_run_store: Any, screen: dict[str, Any]) -> None:
    for entry in screen["runs"]:
        g = run_group(two_run_store, entry["id"])
        layers = g.attrs["run"]["layers"]
        r = stacked(g, "references", "hidden_out")  # (R, L, H)
        iu, ju = np.triu_indices(len(r), 1)
        sep = (1 - cosine(r[iu], r[ju])).mean(0)  # (L,) mean cosine distance over pairs
        order = np.argsort(-sep, kind="stable")
        assert sep.max() > sep.min()  # most and least discriminative layers differ
        p = _point(entry["points"], "The most discriminative layer is")
        m = re.search(r"layer is (\d+)(?:, then ([\d, ]+))? \(hidden_out\).*distance ([\d.]+), ([\d.]+)×", p)
        assert m, p
        assert int(m.group(1)) == layers[int(order[0])]
        nxt = [int(v) for v in m.group(2).split(",")] if m.group(2) else []
        assert nxt == [layers[int(i)] for i in order[1:3]]
        assert m.group(3) == f"{sep.max():.3f}"
        assert m.group(4) == f"{sep.max() / sep.mean():.1f}"


def test_first_screen_closest_reference_sentence(two_run_store: Any, screen: dict[str, Any]) -> None:
    for entry in screen["runs"]:
        g = run_group(two_run_store, entry["id"])
        labels = list(g.attrs["run"]["references"])
        # cosine averaged over layers within each source, then over sources: (M, R)
        z = np.mean([_svr_cosines(g, s).mean(-1) for s in SOURCES], axis=0)
        best = [labels[i] for i in z.argmax(1)]
        counts = Counter(best)
        p = _point(entry["points"], "messages are closest to")
        m = re.search(r"(\d+) of (\d+) messages are closest to “([^”]+)”", p)
        assert m, p
        assert int(m.group(2)) == len(z)
        assert int(m.group(1)) == max(counts.values()) == counts[m.group(3)]
        table = entry["messages"]
        assert [row[2].text for row in table.rows] == best
        assert [row[3].text for row in table.rows] == [f"{v:.3f}" for v in z.max(1)]
        # leans toward: the reference this message beats the conversation's mean for by most
        rel = z - z.mean(0)
        lean, delta = [labels[i] for i in rel.argmax(1)], rel.max(1)
        assert [row[4].text for row in table.rows] == [la if d > 0 else "–" for la, d in zip(lean, delta, strict=True)]
        assert [row[5].text for row in table.rows] == [f"{d:.3f}" if d > 0 else "–" for d in delta]


# ---- the compact first screen (more runs than FULL_DETAIL_RUNS) -------------------------------
def test_compact_table_rows_match_numpy(tmp_path_factory: Any) -> None:
    """Above FULL_DETAIL_RUNS runs the first screen is one row per run: its drift mean and
    most changed layer, closest reference with its count, and most discriminative layer are
    each what NumPy picks from vectors read straight from the Zarr arrays."""
    from actstore.report.gather import gather
    from actstore.report.narrative import FULL_DETAIL_RUNS, first_screen

    st = ActStore.open(tmp_path_factory.mktemp("compact") / "store.zarr", create=True)
    for seed in range(FULL_DETAIL_RUNS + 1):
        write_synthetic_run(st, name=f"many{seed}", seed=seed, n_layers=4, prompt_len=6, n_steps=3, width=32,
                            n_snapshots=5, labels=("joy", "fear", "calm"), store_dtype="float32")  # fmt: skip
    data = gather(st.runs(["all"]))
    screen = first_screen(data)
    table = screen["compact"]
    assert screen["runs"] == [] and table is not None
    assert table.columns == ["run", "scenario", "drift: mean cos", "most changed layer", "closest reference",
                             "most discriminative layer"]  # fmt: skip
    assert len(table.rows) == len(st.run_ids())
    for rr, row in zip(data.runs, table.rows, strict=True):
        assert row[0].text == rr.label
        g = run_group(st, rr.run.id)
        layers = g.attrs["run"]["layers"]
        cos = cosine(vectors_at(g, "hidden_out", _position(g, "initial")),
                     vectors_at(g, "hidden_out", _position(g, "final")))  # fmt: skip
        labels = list(g.attrs["run"]["references"])
        z = np.mean([_svr_cosines(g, s).mean(-1) for s in SOURCES], axis=0)  # (M, R)
        label, count = Counter(labels[i] for i in z.argmax(1)).most_common(1)[0]
        r = stacked(g, "references", "hidden_out")
        iu, ju = np.triu_indices(len(r), 1)
        sep = (1 - cosine(r[iu], r[ju])).mean(0)
        assert [c.text for c in row[1:]] == [
            g.attrs["run"]["scenario"]["name"], f"{cos.mean():.3f}", str(layers[int(np.argmin(cos))]),
            f"{label} ({count}/{len(z)})", str(layers[int(np.argmax(sep))]),
        ]  # fmt: skip


def test_discrimination_ranking_table_matches_numpy(two_run_store: Any) -> None:
    """The run section's ranking: rows are ranks 1..5, and each source's cell at rank r is
    the layer NumPy ranks r-th by mean cosine distance between references, with it."""
    from actstore.report.gather import gather
    from actstore.report.run_section import ranking_table

    rr = gather(two_run_store.runs(["all"])).runs[0]
    table = ranking_table(rr.discrimination)
    g = run_group(two_run_store, rr.run.id)
    layers = g.attrs["run"]["layers"]
    assert [row[0].text for row in table.rows] == ["1", "2", "3", "4", "5"]
    assert "hidden_out" in table.columns
    for col, source in enumerate(table.columns[1:], start=1):
        r = stacked(g, "references", source)
        iu, ju = np.triu_indices(len(r), 1)
        sep = (1 - cosine(r[iu], r[ju])).mean(0)
        order = np.argsort(-sep, kind="stable")
        cells = [row[col].text for row in table.rows]
        assert cells[len(order):] == ["–"] * (5 - min(5, len(order))), source  # fewer layers than ranks
        for text, i in zip(cells, order[:5], strict=False):
            m = re.fullmatch(r"layer (\d+) \((-?[\d.]+)\)", text)
            assert m and int(m.group(1)) == layers[int(i)], (source, text)
            assert float(m.group(2)) == pytest.approx(sep[int(i)], abs=6e-4), (source, text)  # 3 decimals shown


def test_reference_block_follows_each_snapshot_role_and_generated_flag(tmp_path: Path) -> None:
    """A run whose turns are a system prompt and two assistant turns, the last generated:
    each message keeps its own role and generated flag, and the role averages hold the
    assistant's (2 messages) though the run has no user turn."""

    from actstore.report import figures as F
    from actstore.report.gather import gather
    from actstore.report.run_section import reference_block

    st = ActStore.open(tmp_path / "store.zarr", create=True)
    run_id = write_synthetic_run(st, n_layers=3, prompt_len=6, n_steps=3, width=32, n_snapshots=3,
                                 labels=("joy", "fear"), store_dtype="float32")  # fmt: skip
    with edited_run_meta(tmp_path / "store.zarr", run_id) as meta:
        meta["snapshots"] = [{**s, "role": "system" if k == 0 else "assistant", "generated": k == 2}
                             for k, s in enumerate(meta["snapshots"])]  # fmt: skip
    rr = gather(ActStore.open(tmp_path / "store.zarr").runs(["all"])).runs[0]
    block = reference_block(rr, F.Figures())
    shown = [(m["index"], m["role"], m["generated"]) for m in block["messages"]]
    assert shown == [(0, "system", False), (1, "assistant", False), (2, "assistant", True)]
    assert [(r["role"], r["n"]) for r in block["roles"]] == [("assistant", 2)]



def test_a_message_label_is_its_index_and_role_unless_generated() -> None:
    """Chart labels: the snapshot index and a three-letter role; the generated reply says so
    instead, and only when marked."""
    from actstore.report.run_section import message_label

    got = [message_label(0, "system"), message_label(1, "user"), message_label(2, "assistant"), message_label(3, "tool")]
    assert got == ["0·sys", "1·usr", "2·ast", "3·too"]
    assert message_label(4, "assistant", generated=True) == "4·gen"


def test_each_message_chart_is_its_cosine_per_layer(tmp_path: Path) -> None:
    """Each message's charts (one per source) draw, per reference, the cosine of that
    message's snapshot with the reference at each layer: NumPy on the raw arrays."""
    from actstore.report import figures as F
    from actstore.report.gather import gather
    from actstore.report.run_section import reference_block

    st = ActStore.open(tmp_path / "store.zarr", create=True)
    run_id = write_synthetic_run(st, n_layers=3, prompt_len=6, n_steps=3, width=32, n_snapshots=3,
                                 labels=("joy", "fear"), store_dtype="float32")  # fmt: skip
    rr = gather(ActStore.open(tmp_path / "store.zarr").runs(["all"])).runs[0]
    figs = F.Figures()
    block = reference_block(rr, figs)
    g = run_group(st, run_id)
    for k, message in enumerate(block["messages"]):
        assert len(message["charts"]) == len(SOURCES)
        for fid, source in zip(message["charts"], SOURCES, strict=True):
            spec = figs.specs[fid]
            assert source in spec["layout"]["title"]["text"]
            want = _svr_cosines(g, source)[k]  # (references, layers)
            assert [t["name"] for t in spec["data"]] == ["joy", "fear"]
            # the page holds 4 decimals (figures.num): off by at most 5e-5 each
            np.testing.assert_allclose([t["y"] for t in spec["data"]], want, rtol=0, atol=5.1e-5)

def test_reference_source_table_lays_out_each_metric_under_its_source() -> None:
    """Rows are references (their label cell styled as a row label), columns cos / MAE /
    overlap per source in that order, each the mean given, to 3 decimals."""
    from actstore.report.run_section import reference_source_table

    rng = np.random.default_rng(0)
    means = rng.uniform(0, 1, size=(3, 2, 4))  # (metric, reference, source)
    sources = ["hidden_in", "hidden_out", "attn_out", "mlp_down_out"]
    t = reference_source_table(means, ["joy", "fear"], sources)
    assert t.columns == ["reference"] + ["cos", "MAE", "overlap"] * 4
    assert t.groups == [("", 1)] + [(s, 3) for s in sources]
    for r, lab in enumerate(["joy", "fear"]):
        row = t.rows[r]
        assert (row[0].text, row[0].cls) == (lab, "label")
        assert [c.text for c in row[1:]] == [f"{means[m, r, s]:.3f}" for s in range(4) for m in range(3)]
        assert all(c.cls == "num" for c in row[1:])


def test_message_texts_are_the_scenarios_messages_and_the_generated_reply(two_run_store: Any,
                                                                          tmp_path: Path) -> None:  # fmt: skip
    """Each message of a captured run is its whole text from the scenario, the reply is the
    generated text (both read here from the run's Zarr attributes); a run whose scenario
    holds no messages falls back to each snapshot's stored preview."""
    from actstore.report.run_section import generated_messages, message_texts

    for run in two_run_store.runs(["all"]):
        attrs = run_group(two_run_store, run.id).attrs["run"]
        contents = [m["content"] for m in attrs["scenario"]["prompt"]["messages"]]
        generated = [s["index"] for s in attrs["snapshots"] if s.get("generated")]
        assert len(generated) == 1 and attrs["generated_text"]
        expected = {s["index"]: contents[k] for k, s in enumerate(s for s in attrs["snapshots"]
                                                                 if not s.get("generated"))}  # fmt: skip
        expected[generated[0]] = attrs["generated_text"]
        assert message_texts(run) == expected
        assert generated_messages(run) == set(generated)

    st = ActStore.open(tmp_path / "s.zarr", create=True)
    run_id = write_synthetic_run(st, n_snapshots=3)
    assert message_texts(st.run(run_id)) == {0: "m0", 1: "m1", 2: "m2"} and generated_messages(st.run(run_id)) == set()
    # the last turn marked generated: its text is the run's whole generated text, not its preview
    with edited_run_meta(tmp_path / "s.zarr", run_id) as meta:
        meta["snapshots"] = [{**sn, "generated": sn["index"] == 2} for sn in meta["snapshots"]]
        meta["generated_text"] = "a reply longer than its stored preview"
    again = ActStore.open(tmp_path / "s.zarr").run(run_id)
    assert message_texts(again) == {0: "m0", 1: "m1", 2: "a reply longer than its stored preview"}
    assert generated_messages(again) == {2}


def test_topk_explorer_steps_are_the_runs_own_top_k(tmp_path: Path) -> None:
    """Per step: its kind ("" when the run does not say, as in older files), the token it
    generated, and each top-k token with exp(logprob) rounded to 5 places."""

    from actstore.report.run_section import topk_explorer

    st = ActStore.open(tmp_path / "s.zarr", create=True)
    run_id = write_synthetic_run(st, n_steps=3)
    logp = [np.log(0.625), np.log(0.25), np.log(0.125)]
    with edited_run_meta(tmp_path / "s.zarr", run_id) as meta:
        meta["steps"] = [
            {**s, "generated_token": f"t{k}", "top_k": [{"token": f"t{k}", "id": 5, "logprob": logp[0]},
                                                        {"token": None, "id": 9, "logprob": logp[k % 2 + 1]}]}
            for k, s in enumerate(meta["steps"])
        ]  # fmt: skip
        meta["steps"][0].pop("kind", None)
        meta["steps"][1]["kind"] = "decode"
    got = topk_explorer(ActStore.open(tmp_path / "s.zarr").run(run_id))
    assert got is not None and got["k"] == 2
    steps = meta["steps"]
    assert [(s["step"], s["kind"], s["generated"]) for s in got["steps"]] == [
        (steps[k]["step"], steps[k].get("kind", ""), f"t{k}") for k in range(len(steps))]
    assert [s["top"] for s in got["steps"]] == [[["t" + str(k), 0.625], ["9", [0.25, 0.125][k % 2]]]
                                                for k in range(len(steps))]  # fmt: skip


def test_inter_section_names_each_pair_by_its_runs(two_run_store: Any) -> None:
    """The pair's row in each state's overview shows its label (the two runs' labels) and
    the two run ids; each of the pair's charts is titled with the pair and its state."""
    import json

    from actstore.report import figures as F
    from actstore.report.gather import gather
    from actstore.report.overview_section import STATES, inter_section

    data = gather(two_run_store.runs(["all"]))
    (a, la), (b, lb) = [(rr.run.id, rr.label) for rr in data.runs]
    figs = F.Figures()
    sec = inter_section(data, figs)
    assert sec is not None and [s["state"] for s in sec["states"]] == list(STATES)
    for state in sec["states"]:
        [row] = state["overview"].rows
        assert [(c.text, c.cls) for c in row[:2]] == [(f"{la}–{lb}", "label"), (f"{a} vs {b}", "mono small")]
    [pair] = sec["pairs"]
    assert (pair["label"], pair["a"], pair["b"]) == (f"{la}–{lb}", a, b)
    assert len(pair["blocks"]) == len(STATES)
    for block, state in zip(pair["blocks"], STATES, strict=True):
        for fid in block["charts"]:
            assert f"{la}–{lb}, {state}" in json.dumps(figs.specs[fid], ensure_ascii=False)
    legend = sec["legend"]
    assert legend.columns == ["run", "id", "scenario", "generated"]
    names = {rid: run_group(two_run_store, rid).attrs["run"]["scenario"]["name"] for rid in (a, b)}
    assert [[c.text for c in r[:3]] for r in legend.rows] == [[la, a, names[a]], [lb, b, names[b]]]


def _run_with_zero_rows(tmp_path: Path, where: str, rows: tuple[int, ...], **synth: Any) -> tuple[ActStore, str]:
    """A synthetic run (references joy, fear, calm; 4 snapshots; float32) whose ``where``
    rows (snapshots: messages, references: labels) are all zero in every source: vectors
    with no direction, whose cosine with anything is undefined."""
    st = ActStore.open(tmp_path / "s.zarr", create=True)
    run_id = write_synthetic_run(st, n_snapshots=4, labels=("joy", "fear", "calm"), store_dtype="float32", **synth)
    group = raw_run_group(tmp_path / "s.zarr", run_id)
    for source in SOURCES:
        arr = group[f"{where}/{source}"]
        for r in rows:
            arr[r] = np.zeros(arr.shape[1:], dtype=arr.dtype)
    return st, run_id


def test_a_reference_with_no_direction_is_never_the_closest(tmp_path: Path) -> None:
    """A reference whose vectors are all zero has no cosine with anything (NaN): every
    message's closest reference is another one, the best by NumPy's own count. A run whose
    metadata does not name its model still reports (it forms its own model group), and
    says nothing on stderr about the undefined cosines (NumPy's empty-mean warning)."""
    import warnings

    from actstore.report.gather import gather

    st, run_id = _run_with_zero_rows(tmp_path, "references", (1,), n_layers=3, prompt_len=6, n_steps=3,
                                     width=32)  # "fear"  # fmt: skip
    with edited_run_meta(tmp_path / "s.zarr", run_id) as meta:
        del meta["model"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        rr = gather(ActStore.open(tmp_path / "s.zarr").runs(["all"])).runs[0]
    mr = rr.message_reference
    assert mr is not None and mr["fear"].isna().all()
    g = run_group(st, run_id)
    z = np.nanmean([_svr_cosines(g, s).mean(-1) for s in SOURCES], axis=0)  # (M, R), NaN for fear
    expected = [["joy", "fear", "calm"][i] for i in np.nanargmax(np.where(np.isnan(z), -np.inf, z), axis=1)]
    assert "fear" not in expected and mr["best"].tolist() == expected


def test_pair_sentence_names_the_most_and_least_similar_pairs(tmp_path: Path) -> None:
    """Three runs: at the final state of hidden_out, the most and least similar pairs and
    their mean cosines over layers are NumPy's, from vectors read straight from the Zarr
    arrays. Also: the inter-run frame is one clean table (index 0..n-1) when the runs come
    from two models, and with at most OPEN_CARDS_UP_TO runs every run card starts open."""
    from itertools import combinations

    from actstore.report.build import OPEN_CARDS_UP_TO, build_report
    from actstore.report.gather import gather
    from actstore.report.narrative import first_screen

    st = ActStore.open(tmp_path / "s.zarr", create=True)
    ids = [write_synthetic_run(st, name=f"p{i}", seed=i, n_layers=3, prompt_len=5 + i, n_steps=3, width=16,
                               store_dtype="float32") for i in range(3)]  # fmt: skip
    data = gather(st.runs(ids))
    final = {}
    for rid in ids:
        g = run_group(st, rid)
        final[rid] = vectors_at(g, "hidden_out", _position(g, "final"))
    mean_cos = {(a, b): cosine(final[a], final[b]).mean() for a, b in combinations(ids, 2)}
    hi, lo = max(mean_cos, key=mean_cos.__getitem__), min(mean_cos, key=mean_cos.__getitem__)
    assert mean_cos[hi] - mean_cos[lo] > 1e-3
    [sentence] = first_screen(data)["pairs"]
    lab = data.labels
    assert sentence == (
        f"At the final state (hidden_out), the most similar runs are {' and '.join(sorted(lab[r] for r in hi))}"
        f" (mean cosine {mean_cos[hi]:.3f} over layers); the least similar are "
        f"{' and '.join(sorted(lab[r] for r in lo))} ({mean_cos[lo]:.3f})."
    )

    with edited_run_meta(tmp_path / "s.zarr", ids[2]) as meta:  # a fourth run, of another model
        meta["model"] = {**meta["model"], "id": "other"}
    fourth = write_synthetic_run(st, name="p3", seed=3, n_layers=3, prompt_len=5, n_steps=3, width=16,
                                 store_dtype="float32")  # fmt: skip
    with edited_run_meta(tmp_path / "s.zarr", fourth) as meta:
        meta["model"] = {**meta["model"], "id": "other"}
    two_models = gather(ActStore.open(tmp_path / "s.zarr").runs([*ids, fourth]))
    assert len({tuple(sorted(p)) for p in two_models.inter[["run_a", "run_b"]].itertuples(index=False)}) == 2
    assert two_models.inter.index.equals(pd.RangeIndex(len(two_models.inter)))

    assert len(ids) == OPEN_CARDS_UP_TO
    cards = r'<details class="card run-card" id="run-[^"]+"( open)?>'
    for runs, opened in ((ids, ["open"] * 3), ([*ids, fourth], [""] * 4)):
        html = build_report(ActStore.open(tmp_path / "s.zarr"), runs, tmp_path / f"out{len(runs)}", progress=False)
        assert [m.strip() for m in re.findall(cards, html.read_text())] == opened


def test_a_message_with_no_direction_has_no_closest_reference(tmp_path: Path) -> None:
    """A snapshot whose vectors are all zero has no cosine with any reference: its message
    has no closest reference and leans toward none (rather than the first label, or a
    crash), the first-screen sentence counts it apart, the role sentence is left out when
    that message was its role's only one, and the whole report renders,
    without NumPy's all-NaN warnings. The other messages' closest references are NumPy's."""
    import warnings

    from actstore.report import build_report
    from actstore.report.gather import gather
    from actstore.report.narrative import closest_references, message_table, run_points

    labels = ["joy", "fear", "calm"]
    st, run_id = _run_with_zero_rows(tmp_path, "snapshots", (2,), n_layers=3, prompt_len=6, n_steps=3,
                                     width=32)  # message 2  # fmt: skip
    g = run_group(st, run_id)
    z = np.mean([_svr_cosines(g, s).mean(-1) for s in SOURCES], axis=0)  # (M, R), NaN row 2
    assert np.isnan(z[2]).all() and not np.isnan(np.delete(z, 2, axis=0)).any()
    expected = [labels[int(i)] for i in np.delete(z, 2, axis=0).argmax(1)]
    expected.insert(2, None)
    rel = np.delete(z, 2, axis=0)
    rel = rel - rel.mean(0)
    leans = [labels[int(i)] for i in rel.argmax(1)]
    leans.insert(2, None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        rr = gather(ActStore.open(tmp_path / "s.zarr").runs(["all"])).runs[0]
        cr = closest_references(rr)
        points = run_points(rr)
        table = message_table(cr)
        path = build_report(ActStore.open(tmp_path / "s.zarr"), None, tmp_path / "out", progress=False)
    assert rr.message_reference is not None and rr.message_reference["best"].tolist() == expected
    assert cr is not None and cr["best"].tolist() == expected and cr["leans"].tolist() == leans
    assert np.isnan(cr["best_cosine"][2]) and np.isnan(cr["lean"][2])
    np.testing.assert_allclose(np.delete(cr["best_cosine"].to_numpy(), 2), np.delete(z, 2, axis=0).max(1))
    assert [row[2].text for row in table.rows] == [b or "" for b in expected]
    [sentence] = [p for p in points if p.startswith("Averaged over layers and sources")]
    top, n = Counter(b for b in expected if b).most_common(1)[0]
    assert f"{n} of 4 messages are closest to “{top}”" in sentence
    assert "1 has no cosine with any reference" in sentence
    assert table.columns == ["message", "text", "closest", "cosine", "leans toward", "Δ vs its mean"]
    # message 2 is the run's only assistant turn: no role has the closer references
    assert [s["role"] for s in g.attrs["run"]["snapshots"]][2] == "assistant"
    assert not any("turns sit closer to the references" in p for p in points)
    assert path.exists()


def test_two_messages_without_direction_are_counted_in_the_plural(tmp_path: Path) -> None:
    from actstore.report.gather import gather
    from actstore.report.narrative import run_points

    _run_with_zero_rows(tmp_path, "snapshots", (1, 2), n_layers=2, prompt_len=6, n_steps=2, width=16)
    rr = gather(ActStore.open(tmp_path / "s.zarr").runs(["all"])).runs[0]
    [sentence] = [p for p in run_points(rr) if p.startswith("Averaged over layers and sources")]
    assert "; 2 have no cosine with any reference (a zero vector)." in sentence


def test_without_hidden_out_the_drift_sentence_takes_the_first_source() -> None:
    from actstore.report.narrative import PREFERRED_SOURCE, _pick_source

    assert _pick_source(["attn_out", PREFERRED_SOURCE, "q"]) == PREFERRED_SOURCE == "hidden_out"
    assert _pick_source(["attn_out", "mlp_down_out"]) == "attn_out"
    assert _pick_source([]) is None


@pytest.mark.parametrize("closer", ["user", "assistant"])
def test_the_role_sentence_names_whichever_role_is_closer(tmp_path: Path, closer: str) -> None:
    """Snapshots 0..4 of a synthetic run are system, user, assistant, user, assistant.
    The ``closer`` role's snapshots are made copies of the references' own rows (cosine 1
    in every source and layer, mixed over references), so that role is the closer one; the
    sentence must name it and give both means as NumPy computes them here."""
    from actstore.report.gather import gather
    from actstore.report.narrative import run_points

    st = ActStore.open(tmp_path / "s.zarr", create=True)
    run_id = write_synthetic_run(st, n_snapshots=5, labels=("joy", "fear"), store_dtype="float32", n_layers=3,
                                 prompt_len=6, n_steps=3, width=16)  # fmt: skip
    group = raw_run_group(tmp_path / "s.zarr", run_id)
    roles = [s["role"] for s in group.attrs["run"]["snapshots"]]
    assert roles == ["system", "user", "assistant", "user", "assistant"]
    for source in SOURCES:
        snaps, refs = group[f"snapshots/{source}"], group[f"references/{source}"]
        for k, i in enumerate(i for i, r in enumerate(roles) if r == closer):
            snaps[i] = refs[k % refs.shape[0]]
    g = run_group(st, run_id)
    cos = _svr_cosines(g, "hidden_out")  # (M, R, L)
    user = cos[[i for i, r in enumerate(roles) if r == "user"]].mean()
    assistant = cos[[i for i, r in enumerate(roles) if r == "assistant"]].mean()
    assert (user > assistant) == (closer == "user")
    rr = gather(ActStore.open(tmp_path / "s.zarr").runs(["all"])).runs[0]
    p = _point(run_points(rr), "turns sit closer to the references")
    assert p == (f"{closer.capitalize()} turns sit closer to the references (hidden_out: user {user:.3f} vs "
                 f"assistant {assistant:.3f} mean cosine over references and layers).")  # fmt: skip
