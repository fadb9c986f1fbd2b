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
