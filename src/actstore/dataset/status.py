"""Where a corpus capture stands, from the catalog alone: done, pending and orphaned
units, and the one-row-per-dataset listing ``actstore ls`` shows."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from zarr.core.sync import sync

from actstore import naming
from actstore.dataset.settings import UNIT_TAG
from actstore.errors import RunNotFoundError


def unit_entries(entries: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """The catalog entries of ``name``'s units, by unit."""
    mine = [e for e in entries if isinstance(e.get("dataset"), dict) and e["dataset"].get("name") == name]
    return sorted(mine, key=lambda e: (e["dataset"]["unit"], str(e.get("created_at"))))


def unit_of_run(run_id: str, name: str) -> int | None:
    """The unit a run id of dataset ``name`` belongs to (``<name>.u00012_<stamp>_<hex>``)."""
    m = re.fullmatch(re.escape(name + UNIT_TAG) + r"(\d{5,})_\d{8}T\d{6}_[0-9a-f]{6}", run_id)
    return int(m.group(1)) if m else None


def planned_units(units: list[dict[str, Any]]) -> int:
    """Units the dataset has: all of them, or up to the one where the token budget ran out."""
    reached = [e["dataset"]["unit"] for e in units if e["dataset"].get("budget_reached")]
    return min(reached) + 1 if reached else int(units[0]["dataset"]["n_units"])


@dataclass(frozen=True)
class DatasetStatus:
    name: str
    n_units: int | None  # None: no unit committed yet (the total is not known from the store)
    done: list[int]
    pending: list[int]
    orphaned: list[str]  # run groups of this dataset without a catalog entry (killed units)
    n_sequences: int
    n_tokens: int
    fingerprint: str | None
    model: str | None

    @property
    def complete(self) -> bool:
        return self.n_units is not None and not self.pending


def dataset_status(store: Any, name: str) -> DatasetStatus:
    """Done, pending and orphaned units of dataset ``name`` in ``store`` (an ActStore)."""
    units = unit_entries(store.catalog_entries(), name)
    orphaned = [r for r in store.orphans() if unit_of_run(r, name) is not None]
    if not units and not orphaned:
        raise RunNotFoundError(f"{store.location}: no dataset named {name!r} (see `actstore ls`)")
    if not units:
        return DatasetStatus(name, None, [], [], orphaned, 0, 0, None, None)
    total = planned_units(units)
    done = sorted({e["dataset"]["unit"] for e in units if e["dataset"]["unit"] < total})
    return DatasetStatus(
        name, total, done, [u for u in range(total) if u not in done], orphaned,
        sum(int(e["dataset"].get("n_sequences", 0)) for e in units),
        sum(int(e.get("n_positions", 0)) for e in units),
        units[-1]["dataset"].get("fingerprint"), units[-1].get("model"),
    )  # fmt: skip


def remove_units(store: Any, units: list[dict[str, Any]]) -> None:
    """Remove committed units: the catalog entry first (the unit stops being committed),
    then its group. Killed half-way, what is left is an orphan for ``actstore gc``."""
    for e in units:
        sync(store.zstore.delete(naming.catalog_key(e["id"])))
        store.discard(e["id"])


def remove_layout(store: Any, name: str) -> None:
    """Remove the train layout ``name`` (a ``--layout train`` capture's segments): its
    commit markers first, so a kill half-way leaves orphans for ``actstore gc``."""
    from actstore.store import train_layout as tl

    for sub in (tl.COMMITTED, tl.SEGMENTS):
        sync(store.zstore.delete_dir(f"{tl.layout_prefix(name)}/{sub}"))
    sync(store.zstore.delete_dir(tl.layout_prefix(name)))


def listing(entries: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(scenario-run entries, one row per dataset: name, units done/total, sequences,
    tokens, model, created_at of its latest unit, layers), in catalog order."""
    runs: list[dict[str, Any]] = []
    by_name: dict[str, list[dict[str, Any]]] = {}
    for e in entries:
        ds = e.get("dataset")
        if isinstance(ds, dict) and isinstance(ds.get("name"), str):
            by_name.setdefault(ds["name"], []).append(e)
        else:
            runs.append(e)
    rows = []
    for name, group in by_name.items():
        units = unit_entries(group, name)
        total = planned_units(units)
        rows.append({
            "id": name,
            "scenario": name,  # what a selector matches: store.runs([name]) reads every unit
            "units": f"{len({e['dataset']['unit'] for e in units})}/{total}",
            "sequences": sum(int(e["dataset"].get("n_sequences", 0)) for e in units),
            "tokens": sum(int(e.get("n_positions", 0)) for e in units),
            "model": units[-1].get("model"),
            "created_at": max(str(e.get("created_at")) for e in units),
            "n_layers": units[-1].get("n_layers"),
        })  # fmt: skip
    return runs, rows
