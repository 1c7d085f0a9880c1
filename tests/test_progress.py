"""Progress with stderr redirected to a file: plain lines at intervals (tqdm draws nothing there)."""

import re
import sys

import pytest

from vans import progress


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class Stderr:
    """What the loops wrote to stderr; pytest's capture is not a terminal, like `... 2> log.txt`."""

    def __init__(self, capsys):
        assert not sys.stderr.isatty()
        self.capsys = capsys

    def getvalue(self) -> str:
        return self.capsys.readouterr().err


@pytest.fixture
def log_stream(capsys):
    return Stderr(capsys)


def test_a_long_loop_logs_lines_with_elapsed_and_eta_at_intervals(log_stream, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    with progress.progress(50, "sampling") as bar:
        for _ in range(50):  # 0.46 s per step: 23 s in all, as the full-size sampling loop on a GPU
            clock.now += 0.46
            bar.update()
    lines = log_stream.getvalue().splitlines()
    assert len(lines) == 3, lines  # at ~10 s, ~20 s, and the end
    assert re.fullmatch(r"sampling: 22/50 \(44%\), 10\.1 s elapsed, about 12\.9 s left", lines[0]), lines[0]
    assert lines[1].startswith("sampling: 44/50 (88%), 20.2 s elapsed")
    assert lines[2] == "sampling: done 50/50 after 23.0 s"


def test_a_short_loop_logs_nothing_and_nested_loops_stay_silent(log_stream, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    with progress.progress(3, "decoding") as bar:
        for _ in range(3):
            clock.now += 0.5
            bar.update()
    assert log_stream.getvalue() == ""
    with progress.progress(2, "training") as outer:
        for _ in range(2):
            with progress.progress(4, "sampling") as inner:
                for _ in range(4):
                    clock.now += 3.0
                    inner.update()
            outer.update()
    lines = log_stream.getvalue().splitlines()
    assert lines == ["training: 1/2 (50%), 12.0 s elapsed, about 12.0 s left", "training: done 2/2 after 24.0 s"]


def test_an_interrupted_loop_says_where_it_stopped_and_quiet_silences_it(log_stream, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    with pytest.raises(RuntimeError):
        with progress.progress(10, "sampling") as bar:
            clock.now += 11.0
            bar.update()
            raise RuntimeError("boom")
    assert log_stream.getvalue().splitlines()[-1] == "sampling: stopped at 1/10 after 11.0 s"
    with progress.quiet(), progress.progress(10, "sampling") as bar:
        for _ in range(10):
            clock.now += 5.0
            bar.update()
    assert log_stream.getvalue() == ""


def test_only_rank_0_logs_progress_lines_under_data_parallel(log_stream, monkeypatch):
    clock = Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    for rank, expected in (("1", 0), ("0", 2)):
        monkeypatch.setenv("RANK", rank)
        with progress.progress(4, "training") as bar:
            for _ in range(4):
                clock.now += 6.0
                bar.update()
        assert len(log_stream.getvalue().splitlines()) == expected, rank
