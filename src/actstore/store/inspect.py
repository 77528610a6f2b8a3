"""A human-readable summary of one run (what `actstore inspect` prints)."""

from __future__ import annotations

from typing import Any

from actstore.store.reader import RunReader, _ranges


def describe_run(run: RunReader) -> str:
    m = run.meta
    arch = m["model"]["arch"]
    lines = [
        f"run        {run.id}",
        f"scenario   {m['scenario']['name']}" + _scenario_run(m),
        f"created    {m['created_at']}",
        f"model      {m['model']['id']} ({arch['family']}, {arch['num_layers']} layers, "
        f"hidden {arch['hidden_size']}, {m['model']['dtype']} on {m['model']['device']})",
        _prompt_line(run),
        f"steps      {run.n_steps} forward passes ({run.n_positions} positions)",
        f"layers     {_ranges(run.layers)}",
        f"store      {m['store_dtype']}",
        "integrity  " + ("crc32c on every chunk; a missing object is an error" if run.checksummed else
                         "written before checksums: damaged or missing chunks go undetected"),
        "",
        "generated  " + repr(run.generated_text()),
        "",
        "step tensors (per layer: L x positions x width; derived ones are computed on read):",
    ]
    for source in run.sources:
        x = run.array(source)
        derived = source in ("hidden_in", "hidden_out", "mlp_down_in")
        note = "  (derived)" if source == "mlp_down_in" else "  (residual boundaries)" if derived else ""
        lines.append(f"  {source:<14} {str(tuple(x.shape)):<26} {x.dtype}{note}")
    own = {p.key: p for p in run.passes if p.kind == "snapshot"}
    if run.snapshot_index:
        lines += ["", f"conversation snapshots ({len(run.snapshot_index)}; full pass: tokens, own rows stored):"]
        for s in run.snapshot_index:
            p = own.get(s["index"])
            full = f"{p.length:>5} {p.rows:>4}  " if p else ""
            gen = " (generated)" if s.get("generated") else ""
            lines.append(f"  {s['index']:>3} {s['role']:<9} {full}{s['content_preview'][:60]!r}{gen}")
    if run.reference_labels:
        lines += ["", f"references: {', '.join(run.reference_labels)}"]
        refs = [p for p in run.passes if p.kind == "reference"]
        if refs:
            stored = ", ".join(f"{p.key} {p.length}/{p.rows}" for p in refs)
            lines.append(f"  full passes (tokens/own rows): {stored}")
        elif m.get("references_run"):
            lines.append(f"  full passes stored in run {m['references_run']}")
    lines += ["", "first steps:"]
    for st in run.steps[:5]:
        top = ", ".join(f"{t['token']!r} {t['logprob']:.2f}" for t in st["top_k"][:3])
        lines.append(
            f"  step {st['step']:>3} {st['kind']:<7} seq_len {st['seq_len']:>4} -> "
            f"{st['generated_token']!r}  top: {top}"
        )
    return "\n".join(lines)


def _scenario_run(m: dict[str, Any]) -> str:
    """Which capture of a scenario file the run belongs to (absent in older stores)."""
    if not m.get("scenario_run"):
        return ""
    index = m.get("prompt_index")
    return f" (scenario run {m['scenario_run']}" + (f", prompt {index})" if index is not None else ")")


def _prompt_line(run: RunReader) -> str:
    m = run.meta
    ds = m.get("dataset")
    if isinstance(ds, dict):  # a corpus unit (capture-dataset): many sequences back to back
        return (f"dataset    {ds['name']}, unit {ds['unit']} of {ds['n_units']}: {ds.get('n_sequences')} sequences "
                f"from #{ds.get('first_sequence')}, {run.n_positions} stored positions (rows/ says which)")
    return f"prompt     {run.prompt_len} tokens, {len(m['scenario']['prompt']['messages'])} messages"
