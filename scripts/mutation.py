"""Mutation testing for actstore (issue 12 item 3): a habit, not a CI step.

Runs mutmut 3 over ``capture/``, ``store/``, ``query/`` and ``report/`` (or a narrower scope)
with the fast suite (``-m "not slow"``) and writes the score per package to
``benchmarks/results/mutation.md``.

Install (the tool is in the ``dev`` extra; a separate virtualenv keeps the shared one untouched)::

    python3 -m venv /tmp/mutvenv
    /tmp/mutvenv/bin/pip install "torch==2.13.0"      # pinned: the local CPU build
    /tmp/mutvenv/bin/pip install -e '.[dev]'          # brings mutmut>=3.3

Run (from the repository root, with that virtualenv's python)::

    /tmp/mutvenv/bin/python scripts/mutation.py                      # all four packages (hours on 2 cores)
    /tmp/mutvenv/bin/python scripts/mutation.py --package query      # one package
    /tmp/mutvenv/bin/python scripts/mutation.py \\
        --paths src/actstore/query/metrics.py src/actstore/query/plan.py --tests tests/query

How it works: mutmut copies ``src/`` and ``tests/`` into ``mutants/`` (git-ignored; the script
wipes it first unless ``--keep``), writes every mutant of every function in scope into that copy
behind a trampoline, runs the selected tests once to record which tests reach which function,
and then runs, for each mutant, the tests that reach its function (mutmut's per-test
selection), widened here to every test of the files those tests are in: a module- or
session-scoped fixture runs inside the first test that needs it, so mutmut credits the
functions it calls to that test alone, and the file's other tests, which check what the
fixture built, would never meet those functions' mutants; and widened again to every test,
in any file, that uses a shared (class- to session-scoped) fixture whose set-up called the
function (noted in the same pass that records the tests' reach, in ``mutants/fixture-tests.json``). With ``--keep`` mutmut resumes: a mutant that already has a verdict keeps it
(mutants of functions whose source changed are made again and run). After adding tests,
``--keep --retest-survivors`` runs again only the mutants that survived (or had no test)
and are not listed as equivalent, with the current tests (with ``--sample``, also the drawn mutants a
stopped run never reached): a killed verdict stays valid while the source is unchanged and
tests are only added. ``[tool.mutmut]`` in pyproject.toml holds the defaults (fast suite, files copied
alongside the tests); this script narrows ``only_mutate`` (``--package``/``--paths``) and the
test selection (``--tests``) for one run by overriding mutmut's loaded configuration.

What it writes: ``benchmarks/results/mutation.md`` (``--out``), with per package the number of
mutants, killed, survived, timeout, skipped / not covered, the score (killed + timeout over
the mutants that were run), the date, the mutmut version, the scope, the tests, the wall time,
and each surviving mutant as ``file:line`` with the mutation (original -> mutant line). A
surviving mutant is then either killed by a new test or listed as equivalent, with the reason,
in the "Equivalent mutants" section of that file (kept across runs, edited by hand).

Scoring: ``timeout`` counts as killed (the mutant made the suite hang, which is detected:
mutmut's own limit, or ``--wall-limit``, 20 minutes by default);
``no tests`` (no fast test reaches the function) counts as survived, since nothing would catch
a bug there; ``skipped`` and ``caught by type check`` are listed but left out of the score.
"""

from __future__ import annotations

import argparse
import ast
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("capture", "store", "query", "report")
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "mutation.md"
EQUIV_HEADER = "## Equivalent mutants"
# the tests' temporary folders grow by gigabytes over a run (5 GiB in a 60-per-package draw)
MIN_FREE_GIB = 20.0
# a mutant's tests are a part of the fast suite, which runs serially in about 10 minutes here:
# twice that is a hang (or a slowdown no one would miss), not a test still working
WALL_LIMIT_MIN = 20.0

# Runs inside a child interpreter: load mutmut's configuration from pyproject.toml, narrow it
# for this run, then hand over to mutmut's own command line (`mutmut run`).
_CHILD = r"""
import dataclasses, json, os, sys
from mutmut import configuration as c
args = json.loads(sys.argv[1])
cfg = c._load_config()
c._config = dataclasses.replace(
    cfg, only_mutate=args["only_mutate"], pytest_add_cli_args_test_selection=args["tests"]
)
import mutmut.__main__ as m
if args["generate_only"]:
    # Write every mutant into mutants/ (and its .meta) without running any test, so the
    # parent can draw a sample from the full list of mutant names.
    from pathlib import Path
    m.set_mutant_under_test("mutant_generation")
    Path("mutants").mkdir(exist_ok=True)
    m.copy_src_dir(); m.copy_also_copy_files(); m.setup_source_paths()
    m.create_mutants(args["max_children"] or 2)
    sys.exit(0)
names = json.loads(open(args["names_file"]).read()) if args["names_file"] else []
# mutmut looks up the tests of each named mutant's function with [] and fails on a function
# no test reaches; such a mutant is "no tests" (counted as surviving), so look it up softly.
_orig = m.tests_for_mutant_names
def _soft(mutant_names):
    known = m.state().tests_by_mangled_function_name
    return _orig([n for n in mutant_names if "*" in n or m.mangled_name_from_mutant_name(n) in known])
m.tests_for_mutant_names = _soft
# mutmut credits a function to the tests during which it ran. A module- or session-scoped
# fixture runs inside the first test that needs it, so the other tests of that file that
# check the fixture's result are not credited, and a mutant of a function only such a
# fixture calls would never meet the tests that check it. Each function is therefore
# also tested with every other test of the files that reach it (_widened_stats, below).
# Narrower and finer than whole files: while the tests' reach is recorded, note which functions
# each shared (class-, module-, package- or session-scoped) fixture calls while it is set up,
# and which tests use that fixture. Those functions are then tested with every such test,
# wherever it is: a session fixture of conftest.py is built inside one test of one file.
import pytest
from mutmut.runners import harness
SHARED = os.path.abspath("mutants/fixture-tests.json")  # the tests run inside mutants/
class _SharedFixtures:
    def __init__(self):
        self.calls, self.users = {}, {}
    @pytest.hookimpl(wrapper=True)
    def pytest_fixture_setup(self, fixturedef, request):
        if fixturedef.scope == "function":
            return (yield)
        st = m.state()
        outer, st._stats = st._stats, set()
        try:
            return (yield)
        finally:
            inner, st._stats = st._stats, outer
            outer |= inner  # the test that set the fixture up is credited as before
            self.calls.setdefault(f"{fixturedef.baseid}::{fixturedef.argname}", set()).update(inner)
    def pytest_runtest_teardown(self, item, nextitem):
        # the fixtures the test used, those it asked for with request.getfixturevalue included
        for name, fixturedef in item._request._fixture_defs.items():
            if fixturedef.scope != "function":
                key = f"{fixturedef.baseid}::{name}"
                self.users.setdefault(key, set()).add(item.nodeid.removeprefix("mutants/"))
    def pytest_sessionfinish(self, session):
        try:
            with open(SHARED) as f:
                tests_of = {k: set(v) for k, v in json.load(f).items()}
        except FileNotFoundError:
            tests_of = {}
        for key, functions in self.calls.items():
            for fn in functions:
                tests_of.setdefault(fn, set()).update(self.users.get(key, ()))
        with open(SHARED, "w") as f:
            json.dump({k: sorted(v) for k, v in tests_of.items()}, f)
_run_stats = harness.PytestRunner.run_stats
def _run_stats_noting_fixtures(self, *, tests):
    plain = self.execute_pytest
    self.execute_pytest = lambda params, **kw: plain(
        params, **{**kw, "plugins": [*kw.get("plugins", []), _SharedFixtures()]})
    try:
        return _run_stats(self, tests=tests)
    finally:
        del self.execute_pytest
harness.PytestRunner.run_stats = _run_stats_noting_fixtures
_load = m.collect_or_load_stats
def _widened_stats(*a, **k):
    _load(*a, **k)
    st = m.state()
    by_file = {}
    for t in st.duration_by_test:
        by_file.setdefault(t.split("::")[0], set()).add(t)
    for tests in st.tests_by_mangled_function_name.values():
        for f in {t.split("::")[0] for t in tests}:
            tests |= by_file.get(f, set())
    try:
        with open(SHARED) as f:
            shared = json.load(f)
    except FileNotFoundError:  # a run recorded before shared fixtures were noted
        shared = {}
    for fn, tests in shared.items():
        if fn in st.tests_by_mangled_function_name:
            st.tests_by_mangled_function_name[fn] |= {t for t in tests if t in st.duration_by_test}
m.collect_or_load_stats = _widened_stats
# mutmut stops a mutant after (the time of the tests that reach it + a constant) x a factor,
# and with whole files that can be hours: one mutant that makes a test wait (not spin) held
# a worker for 78 minutes. A hard wall limit stops it sooner; it counts as a timeout.
from mutmut.workers import isolation
_register = isolation.register_timeout
isolation.register_timeout = lambda pid, seconds: _register(pid, min(seconds, args["wall_limit_s"]))
argv = ["run"] + (["--max-children", str(args["max_children"])] if args["max_children"] else []) + names
m.cli(argv, prog_name="mutmut")
"""

def _child(args: dict) -> int:
    return subprocess.call([sys.executable, "-c", _CHILD, json.dumps(args)], cwd=ROOT)


def _all_mutants(files: list[Path]) -> dict[str, list[str]]:
    """Every mutant name mutmut wrote, per package, from the .meta files beside the mutants."""
    by_pkg: dict[str, list[str]] = defaultdict(list)
    for path in files:
        meta = ROOT / "mutants" / (str(path) + ".meta")
        if meta.exists():
            by_pkg[_package_of(str(path))] += json.loads(meta.read_text())["exit_code_by_key"]
    return by_pkg


def _draw_sample(files: list[Path], n: int, seed: int) -> list[str]:
    """A seeded draw of up to ``n`` mutants per package, without replacement: the ``n`` whose
    seeded hash of the name is smallest. The same seed and source give the same draw, so
    survivors can be run again after tests are added; a new seed gives a fresh sample, the
    unbiased estimate once tests were written against an earlier one. Each mutant's place
    depends on its own name only, so editing one function changes the draw only where that
    function's mutants enter or leave it (a shuffle of the whole list would redraw the package),
    and a larger ``n`` extends the same draw."""
    import hashlib

    def rank(name: str) -> bytes:
        return hashlib.sha256(f"{seed}:{name}".encode()).digest()

    drawn: list[str] = []
    for _pkg, names in sorted(_all_mutants(files).items()):
        drawn += sorted(names, key=rank)[:n]
    return drawn


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n (sound near 0 and 1, unlike k/n +- 2 SE)."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def _scores(results) -> dict[str, tuple[int, int]]:
    """Per package: (killed + timeout, mutants run) of a _collect result."""
    out: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for path, rows in results.items():
        for _key, status, _diff in rows:
            if status in ("killed", "timeout"):
                out[_package_of(path)][0] += 1
            if status in ("killed", "timeout", "survived", "no tests"):
                out[_package_of(path)][1] += 1
    return {k: (v[0], v[1]) for k, v in out.items()}


def _package_of(path: str) -> str:
    parts = Path(path).parts
    i = parts.index("actstore")
    return parts[i + 1] if len(parts) > i + 2 else "(top level)"


def _mutant_line(src_path: Path, mutant: str, diff: str) -> tuple[int | None, str]:
    """Line of the change in the original file and a one-line description of the mutation."""
    removed = [ln[1:] for ln in diff.splitlines() if ln.startswith("-") and not ln.startswith("---")]
    added = [ln[1:] for ln in diff.splitlines() if ln.startswith("+") and not ln.startswith("+++")]
    desc = " / ".join(f"`{a.strip()}` -> `{b.strip()}`" for a, b in zip(removed, added, strict=False))
    if len(removed) != len(added):
        desc = desc or f"`{' '.join(r.strip() for r in removed)}` -> `{' '.join(a.strip() for a in added)}`"
    name = mutant.rsplit("__mutmut_", 1)[0].rpartition(".")[-1]
    name = name.rsplit("ǁ", 1)[-1]
    if name.startswith("x_"):
        name = name[2:]
    lines = src_path.read_text().splitlines()
    start = 0
    try:
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == name:
                start = node.lineno - 1
                break
    except SyntaxError:
        pass
    if removed:
        target = removed[0].strip()
        for i in range(start, len(lines)):
            if lines[i].strip() == target:
                return i + 1, desc
    return (start + 1 if start else None), desc


def _collect(paths: list[Path], only: set[str] | None = None) -> dict[str, list[tuple[str, str, str | None]]]:
    """Per file: (mutant name, status, diff for survivors) read from mutmut's meta files
    (only the mutants named in ``only`` when given: a sampled run)."""
    from mutmut.mutation.diff_apply import get_diff_for_mutant
    from mutmut.stats import status_by_exit_code

    out: dict[str, list[tuple[str, str, str | None]]] = {}
    for path in paths:
        meta = ROOT / "mutants" / (str(path) + ".meta")
        if not meta.exists():
            continue
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        rows = []
        cwd = os.getcwd()
        os.chdir(ROOT)
        try:
            for key, code in sorted(codes.items()):
                if only is not None and key not in only:
                    continue
                status = status_by_exit_code[code]
                diff = get_diff_for_mutant(key, path=path) if status in ("survived", "no tests") else None
                rows.append((key, status, diff))
        finally:
            os.chdir(cwd)
        out[str(path)] = rows
    return out


def _reset_survivors(paths: list[Path]) -> int:
    """Clear the verdict of every surviving / untested mutant in ``paths`` so mutmut runs it again."""
    from mutmut.stats import status_by_exit_code

    n = 0
    for path in paths:
        meta = ROOT / "mutants" / (str(path) + ".meta")
        if not meta.exists():
            continue
        data = json.loads(meta.read_text())
        codes = data["exit_code_by_key"]
        for key, code in codes.items():
            if code is not None and status_by_exit_code[code] in ("survived", "no tests"):
                codes[key] = None
                n += 1
        meta.write_text(json.dumps(data, indent=4))
    return n


def _keep_equivalents(out: Path) -> str:
    if out.exists():
        text = out.read_text()
        if EQUIV_HEADER in text:
            return text[text.index(EQUIV_HEADER):].rstrip() + "\n"
    return (
        f"{EQUIV_HEADER}\n\nA surviving mutant that no test can kill because it does not change "
        "behaviour is listed here with the reason (edited by hand; kept across runs).\n\n"
        "None listed yet.\n"
    )


def _listed_equivalents(section: str) -> set[tuple[str, str]]:
    """(``package/file.py``, mutant name) of every mutant named in the Equivalent section:
    names in backticks under a ``### package/file.py`` heading (not under a later ``##``)."""
    listed: set[tuple[str, str]] = set()
    where = ""
    for line in section.splitlines():
        if line.startswith("### "):
            where = line[4:].strip()
        elif line.startswith("## "):  # another section (e.g. survivors that are not equivalent)
            where = ""
        for name in re.findall(r"`(x\S*?__mutmut_\d+)`", line):
            listed.add((where, name))
    return listed


def _too_little_space(min_free_gib: float = MIN_FREE_GIB) -> str | None:
    """Why a run should not start, or None. Every mutant's tests write pytest temporary folders
    (tiny-model captures) that pile up under the temporary directory when a mutant is killed
    mid-run; a full disk then fails every test with ENOSPC, which mutmut reports as "Failed to
    run clean test" or as mutants killed for the wrong reason."""
    import tempfile

    for where in (ROOT, Path(tempfile.gettempdir())):
        free = shutil.disk_usage(where).free / 2**30
        if free < min_free_gib:
            return (f"mutation: only {free:.1f} GiB free under {where}; a run needs {min_free_gib:.0f} GiB "
                    f"(fix: delete old pytest folders, e.g. {tempfile.gettempdir()}/pytest-of-*/, "
                    "or mutants/ from an earlier run)")
    return None


def _title(seed: int | None) -> str:
    return "# Mutation testing" + (f": the draw of seed {seed}" if seed is not None else "")


def _equivalent_key(path: str, mutant: str) -> tuple[str, str]:
    """How the Equivalent section names a mutant: its ``package/file.py`` heading and name."""
    return f"{_package_of(path)}/{Path(path).name}", mutant.rsplit(".", 1)[-1]


def _first_pass_scores(out: Path, seed: int) -> dict[str, tuple[int, int]] | None:
    """(killed, run) per package of the draw's first pass, as an earlier retest of the same
    seed wrote them to ``out`` (its "score before the retest" column), so that every later
    retest compares with the suite the draw first met, not with the retest before it."""
    if not out.exists():
        return None
    lines = out.read_text().splitlines()
    if not lines or lines[0] != _title(seed):
        return None
    header = next((line for line in lines if line.startswith("| package |")), None)
    if header is None or "score before the retest" not in header:
        return None
    cols = [c.strip() for c in header.strip("|").split("|")]
    at, n_at = cols.index("score before the retest"), cols.index("mutants")
    first: dict[str, tuple[int, int]] = {}
    for line in lines:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == len(cols) and cells[0] in PACKAGES:
            pct = re.match(r"([\d.]+)%", cells[at])
            if pct:
                n = int(cells[n_at])
                first[cells[0]] = (round(float(pct.group(1)) * n / 100), n)
    return first or None


def _write(out: Path, results, scope: list[str], tests: list[str], seconds: float, version: str,
           partial_note: str | None, resumed: str | None = None, sample_note: str | None = None,
           before: dict[str, tuple[int, int]] | None = None, seed: int | None = None,
           note: str | None = None) -> None:
    equivalents = _keep_equivalents(out)
    listed = _listed_equivalents(equivalents)
    by_pkg: dict[str, Counter] = defaultdict(Counter)
    survivors: dict[str, list[str]] = defaultdict(list)
    for path, rows in results.items():
        pkg = _package_of(path)
        for key, status, diff in rows:
            by_pkg[pkg][status] += 1
            if diff is not None:
                line, desc = _mutant_line(ROOT / path, key, diff)
                tag = " (no fast test reaches it)" if status == "no tests" else ""
                if _equivalent_key(path, key) in listed:
                    by_pkg[pkg]["listed"] += 1
                    tag += " (listed as equivalent)"
                survivors[pkg].append(f"- `{path}:{line}` {desc}{tag}  \n  mutant `{key}`")
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        _title(seed),
        "",
        f"Written by `scripts/mutation.py` on {now} with mutmut {version}, fast suite (`-m \"not slow\"`), "
        "each mutant run against the tests of every test file that reaches its function, and every test "
        "that uses a shared fixture whose set-up calls it.",
        "",
        f"- Scope: {', '.join(f'`{s}`' for s in scope)}",
        f"- Tests: {', '.join(f'`{t}`' for t in tests)}",
        f"- Wall time: {seconds / 60:.1f} min on {os.cpu_count()} cores",
    ]
    if resumed:
        lines.append(f"- Resumed: {resumed}")
    if sample_note:
        lines.append(f"- Sampled: {sample_note}. The score is the sample's; the interval is the 95% "
                     "Wilson interval of the whole package's score it estimates.")
    if note:
        lines += ["", note]
    if partial_note:
        lines += ["", f"**Partial run.** {partial_note}"]
    lines += [
        "",
        "| package | mutants | killed | survived | no tests | timeout | skipped | score "
        + ("| 95% interval " if sample_note else "")
        + ("| score before the retest " if before else "")
        + "| survivors listed as equivalent | survivors not explained | score, equivalents left out |",
        "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if sample_note else "") + ("---:|" if before else "")
        + "---:|---:|---:|",
    ]
    for pkg in sorted(by_pkg):
        c = by_pkg[pkg]
        killed, timeout = c["killed"], c["timeout"]
        survived, no_tests = c["survived"], c["no tests"]
        skipped = c["skipped"] + c["caught by type check"] + c["not checked"]
        listed_n = c.pop("listed", 0)
        other = sum(c.values()) - killed - timeout - survived - no_tests - skipped
        run = killed + timeout + survived + no_tests + other
        score = f"{100 * (killed + timeout) / run:.1f}%" if run else "n/a"
        lo, hi = wilson_interval(killed + timeout, run)
        interval = f" {100 * lo:.1f}–{100 * hi:.1f}% |" if sample_note else ""
        if before:
            bk, bn = before.get(pkg, (0, 0))
            blo, bhi = wilson_interval(bk, bn)
            interval += f" {100 * bk / bn:.1f}% ({100 * blo:.1f}–{100 * bhi:.1f}%) |" if bn else " n/a |"
        lines.append(f"| {pkg} | {sum(c.values())} | {killed} | {survived} | {no_tests} | {timeout} | "
                     f"{skipped} | {score} |{interval} {listed_n} | {survived + no_tests - listed_n} | "
                     + (f"{100 * (killed + timeout) / (run - listed_n):.1f}% |" if run > listed_n else "n/a |"))
    lines += [
        "",
        "Score = (killed + timeout) / (mutants run); `no tests` counts as surviving, and so do the "
        "survivors listed as equivalent. The last column is the usual mutation score, which leaves "
        "the equivalent mutants (no test can tell them from the original) out of the count. A survivor "
        "is explained when the Equivalent section below names it under its file's heading.",
        "",
    ]
    lines += ["## Surviving mutants", ""]
    if not any(survivors.values()):
        lines.append("None.")
    for pkg in sorted(survivors):
        lines += [f"### {pkg}", "", *survivors[pkg], ""]
    lines += ["", equivalents]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines).rstrip() + "\n")


def main(argv: list[str] | None = None) -> int:
    # mutmut runs one test process per core: one torch (OpenMP) thread each, or idle
    # threads spin for the cores the other process needs.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--package", action="append", choices=PACKAGES,
                    help="package under src/actstore to mutate (repeatable; default all four)")
    ap.add_argument("--paths", nargs="+", help="mutate only these files (overrides --package)")
    ap.add_argument("--tests", nargs="+", default=["tests/"],
                    help="pytest paths the mutants are tested with (default tests/, the whole fast suite)")
    ap.add_argument("--max-children", type=int, default=None, help="parallel workers (default: cores)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--keep", action="store_true", help="reuse mutants/ from an earlier run (mutmut resumes)")
    ap.add_argument("--retest-survivors", action="store_true",
                    help="with --keep: run the survived and untested mutants again (after adding tests), "
                         "and a sample's mutants that a stopped run never reached")
    ap.add_argument("--partial-note", help="sentence written under the header when the run is partial")
    ap.add_argument("--note", help="sentence written under the header (what this run is part of)")
    ap.add_argument("--sample", type=int, default=None, metavar="N",
                    help="run a seeded random sample of N mutants per package instead of all of them "
                         "(the score is then an estimate, written with its 95%% interval)")
    ap.add_argument("--seed", type=int, default=0, help="seed of --sample's draw (a new seed draws a fresh sample)")
    ap.add_argument("--wall-limit", type=float, default=WALL_LIMIT_MIN, metavar="MINUTES",
                    help="stop a mutant's tests after this long, whatever mutmut's estimate (a timeout; "
                         "default %(default)s: twice the fast suite's serial time on 2 cores)")
    args = ap.parse_args(argv)

    try:
        from importlib.metadata import version

        mutmut_version = version("mutmut")
    except Exception:  # noqa: BLE001 - a missing tool is reported, not raised
        print("mutmut is not installed in this interpreter; see the top of scripts/mutation.py", file=sys.stderr)
        return 2

    if args.paths:
        scope = [str(Path(p)) for p in args.paths]
        only = scope
    else:
        pkgs = args.package or list(PACKAGES)
        scope = [f"src/actstore/{p}/" for p in pkgs]
        only = [f"src/actstore/{p}/*" for p in pkgs]
    if args.retest_survivors and not args.keep:
        ap.error("--retest-survivors needs --keep")
    if (problem := _too_little_space()) is not None:
        print(problem, file=sys.stderr)
        return 2
    if not args.keep and (ROOT / "mutants").exists():
        shutil.rmtree(ROOT / "mutants")

    import fnmatch

    files = sorted(p.relative_to(ROOT) for p in (ROOT / "src" / "actstore").rglob("*.py"))
    files = [p for p in files if any(fnmatch.fnmatch(str(p), pat) for pat in only)]
    resumed = None
    if args.keep:
        # A file in scope that the earlier run left unmutated (it was out of its scope) has
        # a plain copy in mutants/ that mutmut takes for an already mutated one (its mtime
        # is newer than the source's): remove it so mutmut copies and mutates it afresh.
        # A narrower run also overwrites the mutated copies of files outside its scope with
        # plain ones while their .meta stays: found by content, they are made again too
        # (mutmut keeps the verdicts of functions whose source is unchanged).
        for path in files:
            copy = ROOT / "mutants" / path
            if copy.exists() and (not (ROOT / "mutants" / (str(path) + ".meta")).exists()
                                  or copy.read_bytes() == (ROOT / path).read_bytes()):
                copy.unlink()
        # mutmut records which tests reach which function once, and afterwards only for new
        # tests: functions mutated since (a wider scope, changed source) would be tested with
        # the new tests alone. Forgetting the test durations makes it record them again for
        # every test (one run of the tests); the verdicts are kept.
        # A run from before shared fixtures were noted has no record of them: record again too.
        stats = ROOT / "mutants" / "mutmut-stats.json"
        shared_noted = (ROOT / "mutants" / "fixture-tests.json").exists()
        if stats.exists() and (not args.sample or not shared_noted):  # a sample's scope is always every package
            data = json.loads(stats.read_text())
            data["duration_by_test"] = {}
            stats.write_text(json.dumps(data, indent=4))
        resumed = "`--keep`: verdicts of an earlier run in mutants/ kept (same source), new mutants run"
        if args.retest_survivors and not args.sample:  # a sample names its survivors to mutmut instead
            n = _reset_survivors(files)
            resumed += f"; `--retest-survivors`: its {n} survived / untested mutants run again with today's tests"

    names_file = None
    sample_note = None
    sample_to_run: list[str] = []
    sample: list[str] = []
    before: dict[str, tuple[int, int]] | None = None
    if args.sample:
        _child({"only_mutate": only, "tests": args.tests, "max_children": args.max_children,
                "generate_only": True, "names_file": None, "wall_limit_s": args.wall_limit * 60})
        sample = _draw_sample(files, args.sample, args.seed)
        sample_file = ROOT / "mutants" / "sample.json"
        if args.retest_survivors:
            # the same draw as before (same seed): run again only its survivors, and the
            # mutants a stopped first pass never reached (so the draw ends complete)
            previous = _collect(files, only=set(sample))
            # a survivor listed as equivalent cannot be killed: running it again would only
            # spend the longest test run there is (every reaching test passes) to learn that
            listed = _listed_equivalents(_keep_equivalents(args.out))
            retest = [k for path, rows in previous.items() for k, status, _ in rows
                      if status in ("survived", "no tests") and _equivalent_key(path, k) not in listed]
            unreached = [k for rows in previous.values() for k, status, _ in rows if status == "not checked"]
            sample_to_run = retest + unreached
            # a package this file has no first pass for is scored as it stands before this run
            before = {**_scores(previous), **(_first_pass_scores(args.out, args.seed) or {})}
            resumed = (f"`--keep --retest-survivors`: the draw's {len(retest)} survived / untested "
                       "mutants (those not listed as equivalent) run again with today's tests, and its "
                       f"{len(unreached)} not yet run are run; the other verdicts kept (same source)")
        else:
            # with --keep, a mutant of the draw that has a verdict keeps it (a larger --sample
            # extends the draw and runs only the new ones)
            decided = {k for rows in _collect(files, only=set(sample)).values()
                       for k, status, _ in rows if status != "not checked"} if args.keep else set()
            sample_to_run = [k for k in sample if k not in decided]
        sample_file.write_text(json.dumps(sample_to_run))
        names_file = str(sample_file)
        sample_note = (f"seed {args.seed}, up to {args.sample} mutants drawn per package; "
                       f"{len(sample_to_run)} run this time")
    child = {"only_mutate": only, "tests": args.tests, "max_children": args.max_children,
             "generate_only": False, "names_file": names_file, "wall_limit_s": args.wall_limit * 60}
    t0 = time.monotonic()
    # an empty list of names would make mutmut run every mutant
    rc = _child(child) if not (args.sample and not sample_to_run) else 0
    seconds = time.monotonic() - t0
    if rc != 0:
        print(f"mutmut run exited with {rc}; {args.out} not written", file=sys.stderr)
        return rc

    results = _collect(files, only=set(sample) if args.sample else None)
    _write(args.out, results, scope, args.tests, seconds, mutmut_version, args.partial_note, resumed,
           sample_note=sample_note, before=before, seed=args.seed if args.sample else None, note=args.note)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
