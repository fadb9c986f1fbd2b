"""Tests under a time limit each (:mod:`fastsfm.bench.pytest_limits`): a slow test fails and the next
runs, a test stuck where no Python runs ends its process and the rest run again without it, and every
result is on disk as it finishes."""

import json

from fastsfm.bench.pytest_limits import run_tests

TESTS = """
import signal, time

def test_a():
    pass

def test_slow():
    time.sleep(60)  # Python runs: the timeout's TimeoutError ends it

def test_stuck():
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})  # as a hung kernel: no handler runs
    time.sleep(60)

def test_after():
    pass
"""


def test_a_slow_or_stuck_test_costs_itself_not_the_results_of_the_rest(tmp_path):
    (tmp_path / "test_limits_demo.py").write_text(TESTS)
    results = tmp_path / "results.jsonl"
    summary = run_tests(["-q", str(tmp_path / "test_limits_demo.py")], results, per_test=1.0, budget=120, grace=2.0)
    name = "test_limits_demo.py::"
    assert summary["passed"] == [name + "test_a", name + "test_after"]
    assert summary["failed"] == [name + "test_slow"] and summary["hung"] == [name + "test_stuck"]
    assert summary["runs"] == 2 and summary["unfinished"] == []
    records = [json.loads(line) for line in results.read_text().splitlines()]
    slow = [r for r in records if r["nodeid"] == name + "test_slow" and r["event"] == "end"]
    assert slow[0]["outcome"] == "failed" and slow[0]["seconds"] < 10  # ended by its limit, not by the sleep


def test_the_budget_stops_the_run_and_names_the_test_it_stopped(tmp_path):
    (tmp_path / "test_limits_demo.py").write_text(TESTS)
    summary = run_tests([str(tmp_path / "test_limits_demo.py")], tmp_path / "r.jsonl", per_test=30, budget=4)
    assert summary["exit"] == "budget" and summary["unfinished"] == ["test_limits_demo.py::test_slow"]
    assert summary["passed"] == ["test_limits_demo.py::test_a"]
