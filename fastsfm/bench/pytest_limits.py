"""Tests under a time limit each, with every result on disk as it finishes: for lent GPU minutes.

A pytest plugin (``-p fastsfm.bench.pytest_limits``) and the runner that uses it:

* ``--test-timeout S``: a test that runs past S seconds fails with a ``TimeoutError`` raised in it
  (``SIGALRM``; the next test runs); one stuck where no Python runs (a hung kernel, a blocked
  driver call) is ended after ``--test-timeout-grace`` more seconds by :mod:`faulthandler`, which
  prints every thread's stack and exits the process.
* ``--results-jsonl PATH``: one line per test as it starts (``{"nodeid", "event": "start"}``) and
  one per outcome (``{"nodeid", "event": "end", "outcome", "when", "seconds"}``), flushed at once,
  so a killed process leaves every finished result and names the test it was in.

:func:`run_tests` runs pytest in a child process under both, within a time budget, and when a
child dies in a test it records that test as hung and runs the tests not yet run again, without
it: one hang costs one test and its limit, not the results of the rest.  Needs nothing beyond
pytest (the lent machines have no package index for ``pytest-timeout``).
"""

from __future__ import annotations

import faulthandler
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

__all__ = ["run_tests"]


def pytest_addoption(parser) -> None:
    group = parser.getgroup("fastsfm limits")
    group.addoption("--test-timeout", type=float, default=0.0, help="seconds per test (0: no limit)")
    group.addoption("--test-timeout-grace", type=float, default=30.0, help="seconds more before the process ends")
    group.addoption("--results-jsonl", default=None, help="append each test's start and outcome here")
    group.addoption("--exclude-ids", default=None, help="a JSON list of node ids not to run (exact matches)")


def pytest_collection_modifyitems(config, items) -> None:
    path = config.getoption("--exclude-ids")
    if path:  # exact ids: --deselect matches prefixes (it would drop test_after with test_a)
        excluded = set(json.loads(Path(path).read_text()))
        config.hook.pytest_deselected(items=[item for item in items if item.nodeid in excluded])
        items[:] = [item for item in items if item.nodeid not in excluded]


def _record(config, **fields) -> None:
    path = config.getoption("--results-jsonl")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(fields) + "\n")


def _timed_out(signum, frame) -> None:
    raise TimeoutError("the test ran past --test-timeout")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    config = item.config
    limit = config.getoption("--test-timeout")
    _record(config, nodeid=item.nodeid, event="start")
    if limit > 0:
        faulthandler.dump_traceback_later(limit + config.getoption("--test-timeout-grace"), exit=True)
        previous = signal.signal(signal.SIGALRM, _timed_out)
        signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        yield
    finally:
        if limit > 0:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
            faulthandler.cancel_dump_traceback_later()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    if report.when == "call" or report.outcome != "passed":  # a setup or teardown that passed says nothing
        _record(
            item.config,
            nodeid=report.nodeid,
            event="end",
            outcome=report.outcome,
            when=report.when,
            seconds=round(report.duration, 3),
        )


def _read(path: Path) -> tuple[list[str], dict[str, dict]]:
    """``(started node ids in order, the last end record per node id)`` of a results file."""
    started, ended = [], {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by the kill
                continue
            if rec["event"] == "start":
                started.append(rec["nodeid"])
            elif rec["outcome"] != "passed" or rec["nodeid"] not in ended:
                ended[rec["nodeid"]] = rec
    return started, ended


def run_tests(args: list[str], results: Path, per_test: float, budget: float, grace: float = 30.0) -> dict:
    """Run ``pytest args`` in child processes under :mod:`this plugin <fastsfm.bench.pytest_limits>`
    until every selected test has a result or the budget (seconds) is spent.  ``results`` gets the
    JSON lines; returns ``{"passed", "failed", "skipped", "hung", "unfinished", "runs", "exit"}``:
    node id lists (``hung``: a child died in them; ``unfinished``: running when the budget ran
    out), the children run and the last one's exit code (``"budget"`` when it was stopped)."""
    results.unlink(missing_ok=True)
    began, hung, unfinished, runs, code = time.monotonic(), [], [], 0, None
    while True:
        left = budget - (time.monotonic() - began)
        if left <= 0:
            break
        started, ended = _read(results)
        exclude = results.with_suffix(".exclude.json")
        exclude.write_text(json.dumps([*ended, *hung]))
        cmd = [sys.executable, "-m", "pytest", "-p", __name__, "-p", "no:cacheprovider", *args]
        cmd += [f"--test-timeout={per_test}", f"--test-timeout-grace={grace}", f"--results-jsonl={results}"]
        cmd += [f"--exclude-ids={exclude}"]
        runs += 1
        try:
            code = subprocess.run(cmd, timeout=left, stdout=sys.stderr).returncode
        except subprocess.TimeoutExpired:
            code = "budget"
        started, ended = _read(results)
        stuck = [nodeid for nodeid in started if nodeid not in ended and nodeid not in hung]
        if code == "budget":
            unfinished = stuck
            break
        if not stuck:  # every test it started has its result: the run is complete
            break
        hung.append(stuck[-1])  # the child died in this test (faulthandler's exit): the rest again, without it
    results.with_suffix(".exclude.json").unlink(missing_ok=True)
    _, ended = _read(results)
    by = {k: [n for n, r in ended.items() if r["outcome"] == k] for k in ("passed", "failed", "skipped")}
    return {**by, "hung": hung, "unfinished": unfinished, "runs": runs, "exit": code}
