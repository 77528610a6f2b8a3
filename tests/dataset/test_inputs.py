"""Input formats, label and messages columns, which positions are kept, the token
budget, generation, and bad input (one line, exit code 2, nothing written). Expected
values come from the tokenizer, pyarrow, datasets and zarr directly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from actstore.testing import topic_texts

from .conftest import write_jsonl

N = 6


def _rows(store: Path) -> dict[str, np.ndarray]:
    """Every unit's rows arrays, back to back in unit order (zarr read directly)."""
    root = zarr.open_group(str(store), mode="r")
    units = sorted(root["runs"].group_keys(), key=lambda r: root["runs"][r].attrs["run"]["dataset"]["unit"])
    out: dict[str, list[np.ndarray]] = {}
    for r in units:
        g = root["runs"][r]
        rows = g["rows"]
        for name in rows.array_keys():
            out.setdefault(name, []).append(np.asarray(rows[name][...]))
        if "labels" in rows:
            for name in rows["labels"].array_keys():
                out.setdefault(f"labels/{name}", []).append(np.asarray(rows["labels"][name][...]))
        out.setdefault("n_residual", []).append(np.asarray([g["acts/residual"].shape[1]]))
    return {k: np.concatenate(v) for k, v in out.items()}


def _capture(tmp_path: Path, loaded: Any, input_path: Path, **kw: Any) -> Path:
    from actstore import capture_dataset

    store = tmp_path / "s.zarr"
    kw.setdefault("unit_size", 4)
    kw.setdefault("batch_size", 3)
    capture_dataset(str(input_path), str(store), name="d", model="tiny", loaded=loaded, progress=False, **kw)
    return store


@pytest.fixture
def texts() -> list[tuple[str, str]]:
    return topic_texts(N, max_chars=120)


def _expected(loaded: Any, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ids = [loaded.tokenizer(t)["input_ids"] for t in texts]
    return (np.concatenate([np.asarray(s) for s in ids]), np.repeat(np.arange(len(ids)), [len(s) for s in ids]),
            np.concatenate([np.arange(len(s)) for s in ids]))  # fmt: skip


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "txt", "txt-folder", "hf-disk"])
def test_input_formats(fmt: str, tmp_path: Path, tiny_model_loaded: Any, texts: list[tuple[str, str]]) -> None:
    records = [{"body": t, "topic": k, "n": i} for i, (k, t) in enumerate(texts)]
    labels: tuple[str, ...] = ("topic", "n")
    if fmt == "jsonl":
        path = write_jsonl(tmp_path / "c.jsonl", records)
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "c.parquet"
        pq.write_table(pa.Table.from_pylist(records), path, row_group_size=4)
    elif fmt == "hf-disk":
        import datasets

        path = tmp_path / "saved"
        datasets.Dataset.from_list(records).save_to_disk(str(path))
    elif fmt == "txt":
        path = tmp_path / "c.txt"
        path.write_text("\n\n".join(t for _, t in texts) + "\n")  # blank lines are no sequence
        labels = ()
    else:
        path = tmp_path / "texts"
        path.mkdir()
        for i, (_, t) in enumerate(texts):
            (path / f"{i:03d}.txt").write_text(t)
        labels = ()
    column = "text" if fmt.startswith("txt") else "body"
    store = _capture(tmp_path, tiny_model_loaded, path, text_column=column, label_columns=labels)
    rows = _rows(store)
    tok, seq, pos = _expected(tiny_model_loaded, [t for _, t in texts])
    np.testing.assert_array_equal(rows["token_ids"], tok)
    np.testing.assert_array_equal(rows["sequence_index"], seq)
    np.testing.assert_array_equal(rows["position"], pos)
    assert rows["n_residual"].sum() == len(tok)
    if labels:
        assert list(rows["labels/topic"]) == [texts[s][0] for s in seq]
        np.testing.assert_array_equal(rows["labels/n"], seq)


def test_run_rows_and_reader_agree(tmp_path: Path, tiny_model_loaded: Any, texts: list[tuple[str, str]]) -> None:
    from actstore import open_store
    from actstore.store.rows import run_rows

    path = write_jsonl(tmp_path / "c.jsonl", [{"text": t, "topic": k} for k, t in texts])
    store = _capture(tmp_path, tiny_model_loaded, path, label_columns=("topic",), capture=("hidden_states", "mlp"))
    raw = _rows(store)
    runs = sorted(open_store(str(store)).runs(["d"]), key=lambda r: r.meta["dataset"]["unit"])
    got = [run_rows(r) for r in runs]
    np.testing.assert_array_equal(np.concatenate([g.token_ids for g in got]), raw["token_ids"])
    assert list(np.concatenate([g.labels["topic"] for g in got])) == list(raw["labels/topic"])
    for r in runs:
        assert r.array("hidden_out").shape[1] == r.array("mlp_down_in").shape[1] == len(run_rows(r))


def test_messages_column(tmp_path: Path, tiny_model_loaded: Any, texts: list[tuple[str, str]]) -> None:
    tok = tiny_model_loaded.tokenizer
    convs = [[{"role": "user", "content": f"What is {k}?"}, {"role": "assistant", "content": t}] for k, t in texts]
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": m} for m in convs])
    store = _capture(tmp_path, tiny_model_loaded, path, messages_column="messages")
    want = [tok(tok.apply_chat_template(m, tokenize=False), add_special_tokens=False)["input_ids"] for m in convs]
    np.testing.assert_array_equal(_rows(store)["token_ids"], np.concatenate([np.asarray(w) for w in want]))


def test_positions_last_slice_and_exclude_special(tmp_path: Path, tiny_model_loaded: Any,
                                                  texts: list[tuple[str, str]]) -> None:  # fmt: skip
    tok = tiny_model_loaded.tokenizer
    # special tokens at both ends (and one inside), so dropping them moves "last" too
    lines = [f"{tok.bos_token}{t}{tok.eos_token} more{tok.eos_token}" for _, t in texts]
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": line} for line in lines])
    ids = [tok(line)["input_ids"] for line in lines]
    special = set(tok.all_special_ids)
    assert all(s[0] in special and s[-1] in special for s in ids)
    cases = {
        ("last", False): [[len(s) - 1] for s in ids],
        ("2:5", False): [[2, 3, 4] for _ in ids],
        ("-3:", False): [list(range(len(s) - 3, len(s))) for s in ids],
        ("all", True): [[p for p, t in enumerate(s) if t not in special] for s in ids],
        ("last", True): [[max(p for p, t in enumerate(s) if t not in special)] for s in ids],
    }
    for (positions, exclude), want in cases.items():
        store = tmp_path / f"{positions}-{exclude}".replace(":", "_")
        from actstore import capture_dataset

        capture_dataset(str(path), str(store), name="d", model="tiny", loaded=tiny_model_loaded, progress=False,
                        positions=positions, exclude_special=exclude, unit_size=4)  # fmt: skip
        rows = _rows(store)
        np.testing.assert_array_equal(rows["position"], np.concatenate([np.asarray(w) for w in want]),
                                      err_msg=f"{positions} exclude_special={exclude}")  # fmt: skip
        np.testing.assert_array_equal(rows["token_ids"], [ids[s][p] for s, w in enumerate(want) for p in w])
        assert not exclude or not special & set(rows["token_ids"].tolist())


def test_max_tokens_stops_exactly(tmp_path: Path, tiny_model_loaded: Any, texts: list[tuple[str, str]]) -> None:
    from actstore import open_store
    from actstore.dataset import dataset_status

    path = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for _, t in texts])
    tok, seq, pos = _expected(tiny_model_loaded, [t for _, t in texts])
    budget = int(len(tok) * 0.4)
    store = _capture(tmp_path, tiny_model_loaded, path, max_tokens=budget, unit_size=2, batch_size=2)
    rows = _rows(store)
    np.testing.assert_array_equal(rows["token_ids"], tok[:budget])
    np.testing.assert_array_equal(rows["position"], pos[:budget])
    st = dataset_status(open_store(str(store)), "d")
    assert st.complete and st.n_tokens == budget and st.n_units < 3  # later units never started


def test_max_new_tokens_stores_greedy_generation(tmp_path: Path, tiny_model_loaded: Any,
                                                 texts: list[tuple[str, str]]) -> None:  # fmt: skip
    import torch

    gen = 4
    path = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for _, t in texts])
    store = _capture(tmp_path, tiny_model_loaded, path, max_new_tokens=gen, capture=("hidden_states",))
    rows = _rows(store)
    model, tok = tiny_model_loaded.model, tiny_model_loaded.tokenizer
    eos = {tok.eos_token_id}
    for i, (_, t) in enumerate(texts):  # plain greedy decoding, one sequence, no cache
        ids = list(tok(t)["input_ids"])
        prompt = len(ids)
        for _ in range(gen - 1):  # the gen-th token is chosen but never fed
            with torch.inference_mode():
                nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            if nxt in eos:
                break
            ids.append(nxt)
        mine = rows["sequence_index"] == i
        np.testing.assert_array_equal(rows["token_ids"][mine], ids, err_msg=f"sequence {i}")
        np.testing.assert_array_equal(rows["position"][mine], np.arange(len(ids)))
        assert len(ids) > prompt


BAD = [
    (["missing.jsonl"], "no such file"),
    (["bad.jsonl"], "line 2 is not JSON"),
    (["good.jsonl", "--text-column", "body"], "no text column 'body'"),
    (["good.parquet", "--label-column", "nope"], "no column 'nope'"),
    (["good.jsonl", "--capture", "attention_weights"], "square matrix"),
    (["good.jsonl", "--positions", "3..5"], "--positions"),
    (["good.jsonl", "--name", "a/b"], "dataset name"),
    (["good.csv"], "unknown input format"),
    (["good.jsonl", "--messages-column", "text"], "not a list of"),
    (["good.jsonl", "--model-dtype", "fp8"], "--model-dtype"),
    (["good.jsonl", "--device", "tpu"], "--device"),
    (["good.jsonl", "--batch-size", "0"], "--batch-size 0"),
]


@pytest.mark.parametrize(("args", "message"), BAD, ids=[m for _, m in BAD])
def test_bad_input_is_one_line_exit_2_nothing_written(args: list[str], message: str, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    import pyarrow as pa
    import pyarrow.parquet as pq

    from actstore.cli import main

    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "good.jsonl", [{"text": "a b c"}, {"text": "d e"}])
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{"text": \n')
    pq.write_table(pa.Table.from_pylist([{"text": "a"}]), tmp_path / "good.parquet")
    (tmp_path / "good.csv").write_text("text\na\n")
    if "--name" not in args:
        args = [*args, "--name", "d"]
    result = CliRunner().invoke(main, ["capture-dataset", *args, "--store", "s.zarr", "--model", "no-such-model"])
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert not (tmp_path / "s.zarr").exists()
