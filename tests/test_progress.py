"""Progress that suits a log file: a few plain lines, not megabytes of carriage returns."""

import io

from fastsfm.progress import Progress


def test_progress_writes_few_lines_to_a_log():
    log = io.StringIO()
    bar = Progress(5000, "distill", stream=log, interval=3600)
    for _ in range(5000):
        bar.update(loss=0.5)
    bar.close()
    lines = log.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("distill: 5000/5000 it") and "loss=0.5" in lines[0]


def test_log_lines_carry_elapsed_time_and_eta(monkeypatch):
    from fastsfm import progress

    now = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    log = io.StringIO()
    bar = Progress(5000, "distill", stream=log, interval=60, unit="step")
    now[0] = 125.0
    bar.update(1000, loss=0.25)  # 8 steps/s: 4000 steps left, 500 s
    now[0] = 625.0
    bar.update(4000)
    bar.close()
    first, last = log.getvalue().splitlines()[:2]
    assert first == "distill: 1000/5000 step, 2m05s elapsed, ETA 8m20s, 8 step/s loss=0.25"
    assert last.startswith("distill: 5000/5000 step, 10m25s elapsed, 8 step/s") and "ETA" not in last
    assert progress.duration(42.4) == "42 s" and progress.duration(3 * 3600 + 7 * 60 + 9) == "3h07m"
