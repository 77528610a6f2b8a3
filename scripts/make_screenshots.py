"""Regenerate the README's figures: screenshots of the HTML report and one heatmap.

Run: ``.venv/bin/python scripts/make_screenshots.py [--store PATH] [--run latest:emotions] [--out docs/img]``

Builds the report of one run (default: the latest emotions run, else the latest run)
into a temporary folder, opens it in headless Chromium with the network cut (as the
browser test does), and writes:

* ``report_summary.png``: the first screen (what the run shows, in plain words);
* ``report_references.png``: the run card's reference comparison block;
* ``report_topk.png``: the generation explorer after moving its slider;
* ``heatmap_mlp_act.png``: the MLP activation of decode step 5 at a middle layer, its
  width drawn as a grid (``actstore heatmap RUN --source mlp_act --steps 5
  --normalize signed --cmap RdBu_r``); hidden_out when the run has no MLP capture;
* ``view.png``: ``actstore view`` on the run (its server on loopback, same browser);
* ``view_pair.png``, ``view_group.png``, ``view_depth.png``: its compare panel with two
  conversation snapshots, then with snapshots and references as a group, and its depth
  panel on a snapshot's full pass;
* ``view_builder.png``: the scenario builder with the run's scenario cloned and one
  mistake made, shown at its field.

Needs the dev extra (playwright) and a Chromium binary (``apt-get install chromium``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def pick_run(store: object, selector: str | None) -> str:
    from actstore.errors import RunNotFoundError

    for sel in [selector] if selector else ["latest:emotions", "latest"]:
        try:
            return str(store.resolve(sel)[-1])  # type: ignore[attr-defined]
        except RunNotFoundError:
            continue
    raise SystemExit(
        "no run found in the store: capture one first (actstore capture scenarios/emotions.yaml)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--store", default=os.environ.get("ACTSTORE_STORE", str(ROOT / "stores" / "actstore.zarr"))
    )
    ap.add_argument("--run", default=None, help="run selector (default: latest:emotions, else latest)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "img"))
    args = ap.parse_args()

    from actstore.report import build_report, write_heatmaps
    from actstore.report.browser import find_chromium, open_page, wait_idle
    from actstore.store.store import ActStore

    if find_chromium() is None:
        raise SystemExit("no Chromium binary: apt-get install chromium (or set $CHROMIUM)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store = ActStore.open(args.store)
    run_id = pick_run(store, args.run)
    tmp = Path(tempfile.mkdtemp(prefix="actstore-shots-"))
    try:
        report = build_report(store, [run_id], tmp / "report", progress=False)
        with open_page(report, width=1400, height=1000) as (page, log):
            wait_idle(page)
            page.screenshot(path=str(out / "report_summary.png"))
            refs = page.locator(".run-card .ref-block").first
            if refs.count():
                refs.scroll_into_view_if_needed()
                wait_idle(page)
                refs.locator("h3").first.scroll_into_view_if_needed()
                page.evaluate("window.scrollBy(0, -70)")  # clear the sticky header
                page.screenshot(path=str(out / "report_references.png"))
            topk = page.locator(".topk").first
            if topk.count():
                slider = topk.locator(".topk-slider")
                slider.focus()
                for _ in range(3):
                    page.keyboard.press("ArrowRight")
                wait_idle(page)
                page.locator(
                    ".run-card h3", has_text="Generation explorer"
                ).first.scroll_into_view_if_needed()
                page.evaluate("window.scrollBy(0, -110)")  # clear the sticky header
                page.screenshot(path=str(out / "report_topk.png"))
            if log.errors or log.blocked:
                print(
                    f"warning: console errors {log.errors[:3]}, blocked requests {log.blocked[:3]}",
                    file=sys.stderr,
                )
        run = store.run(run_id)
        source = "mlp_act" if "mlp_act" in run.sources else "hidden_out"
        layer = run.layers[len(run.layers) // 2]
        step = min(5, run.n_steps - 1)  # a decode step: one vector, drawn as a grid
        [png] = write_heatmaps(run, source, [layer], [step], cmap="RdBu_r", normalize="signed",
                               out=tmp / "heatmaps", progress=False)  # fmt: skip
        shutil.copyfile(png, out / f"heatmap_{source}.png")
        view_screenshot(store, run_id, out / "view.png")
        compare_screenshots(store, run_id, out)
        builder_screenshot(store, run_id, out / "view_builder.png")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for p in sorted(out.glob("*.png")):
        print(p)


def view_screenshot(store: object, run_id: str, path: Path) -> None:
    from actstore.report.browser import open_page
    from actstore.view import serve

    server = serve(store, run_id, port=0)
    try:
        with open_page(server.url, width=1500, height=1250) as (page, log):
            page.wait_for_function("window.actstoreView && window.actstoreView.idle()", timeout=120_000)
            page.wait_for_timeout(500)
            page.screenshot(path=str(path))
            if log.errors or log.blocked:
                print(f"warning (view): {log.errors[:3]} {log.blocked[:3]}", file=sys.stderr)
    finally:
        server.shutdown()


def compare_screenshots(store: object, run_id: str, out: Path) -> None:
    """The compare panel (a pair, then a group) and the depth panel, opened from the
    address the page keeps its selection in."""
    from urllib.parse import quote

    from actstore.report.browser import open_page
    from actstore.view import serve

    run = store.run(run_id)  # type: ignore[attr-defined]
    snaps = [f"snapshot:{s['index']}" for s in run.snapshot_index if not s.get("generated")]
    refs = [f"reference:{label}" for label in run.reference_labels]
    pair = snaps[-2:] if len(snaps) >= 2 else (snaps + refs)[:2]
    group = snaps[-4:] + refs[:4]
    server = serve(store, run_id, port=0)
    try:
        for name, states, section in (("view_pair", pair, "#compare"), ("view_group", group, "#compare"),
                                      ("view_depth", pair[:1], "#depth")):  # fmt: skip
            url = server.url + ("&" if "?" in server.url else "?") + "&".join(
                "cmp=" + quote(f"{run_id}@{s}") for s in states
            )
            with open_page(url, width=1500, height=1250) as (page, log):
                page.wait_for_function("window.actstoreView && window.actstoreView.idle()", timeout=300_000)
                page.add_style_tag(content="header.top, .controls { position: static !important; }")  # not over the panel
                page.wait_for_timeout(800)
                page.locator(section).screenshot(path=str(out / f"{name}.png"))
                if log.errors or log.blocked:
                    print(f"warning ({name}): {log.errors[:3]} {log.blocked[:3]}", file=sys.stderr)
    finally:
        server.shutdown()


def builder_screenshot(store: object, run_id: str, path: Path) -> None:
    """The builder with the run's scenario cloned and a sampling temperature below 0."""
    from actstore.report.browser import open_page
    from actstore.view import serve

    with tempfile.TemporaryDirectory() as tmp:
        server = serve(store, run_id, port=0, scenarios=Path(tmp) / "scenarios")
        try:
            with open_page(server.url, width=1500, height=1250) as (page, log):
                page.wait_for_function("window.actstoreView && window.actstoreView.idle()", timeout=300_000)
                page.click("#b-clone")
                page.wait_for_function("document.getElementById('b-yaml').value.length > 0", timeout=60_000)
                page.wait_for_function("window.actstoreView.idle()", timeout=60_000)  # the clone checked
                page.check('[data-field="generation.do_sample"]')
                page.fill('[data-field="generation.temperature"]', "-1")
                page.wait_for_selector('.field-error[data-for="generation.temperature"]', timeout=60_000)
                page.add_style_tag(content="header.top, .controls { position: static !important; }")
                page.wait_for_timeout(500)
                page.locator("#builder").screenshot(path=str(path))
                if log.errors or log.blocked:
                    print(f"warning (builder): {log.errors[:3]} {log.blocked[:3]}", file=sys.stderr)
        finally:
            server.shutdown()


if __name__ == "__main__":
    main()
