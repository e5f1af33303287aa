"""Progress a user can follow: the progress helper's lines and time left (on a fake clock), silent
on other ranks than 0, a tqdm bar on a terminal; the pipeline's one line per finished stage."""

import io
import json
import logging

import pytest

from dpo_dist import dist, pipeline
from dpo_dist.progress import Progress, duration


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "dpo_dist.progress"]


@pytest.mark.parametrize("seconds,text", [(0, "0s"), (44.6, "45s"), (60, "1m00s"), (372, "6m12s"), (3599, "59m59s"),
                                          (3720, "1h02m"), (90000, "25h00m")])
def test_duration(seconds, text):
    assert duration(seconds) == text


def test_log_lines_give_the_time_left_at_the_first_update_then_every_interval_and_at_the_end(caplog):
    """Not a terminal (a Slurm log): a line at the first update, none until ``every`` seconds have
    passed, one at the end. Time left = the steps to go at the mean rate so far."""
    clock = Clock()
    bar = Progress(10, "train", unit="step", every=30, enabled=True, clock=clock, stream=io.StringIO())
    with caplog.at_level(logging.INFO):
        clock.now += 5
        bar.update(1, loss=0.61234)
        clock.now += 5
        bar.update(1, loss=0.5)  # 10 s since the last line: quiet
        clock.now += 30
        bar.update(2, loss=0.4)
        clock.now += 20
        bar.update(6, loss=0.3125)
    assert _lines(caplog) == [
        "train: 1/10 steps (10%), loss 0.6123, 5s elapsed, eta 45s",
        "train: 4/10 steps (40%), loss 0.4, 40s elapsed, eta 1m00s",
        "train: 10/10 steps (100%), loss 0.3125, 1m00s elapsed, eta 0s",
    ]


def test_a_resumed_run_estimates_from_its_own_rate():
    """40 of 100 steps were done before a resume: 10 steps in 10 s leave 50 steps, 50 s."""
    clock = Clock()
    bar = Progress(100, "train", unit="step", initial=40, enabled=True, clock=clock, stream=io.StringIO())
    assert bar.line() == "train: 40/100 steps (40%), 0s elapsed, eta ?"
    clock.now += 10
    bar.update(10)
    assert bar.eta(clock.now) == pytest.approx(50) and bar.line().endswith("10s elapsed, eta 50s")


def test_silent_on_every_rank_but_0(monkeypatch, caplog):
    """Rank 1 of 2 (from the launcher's environment): no bar on its terminal, no log line."""
    monkeypatch.setattr(dist, "_ENV", None)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    terminal, clock = Terminal(), Clock()
    with caplog.at_level(logging.INFO):
        with Progress(4, "reference", unit="pair", clock=clock, stream=terminal) as bar:
            for _ in range(4):
                clock.now += 1
                bar.update(1)
        with Progress(4, "reference", unit="pair", clock=clock, stream=io.StringIO()) as bar:
            bar.update(4)
    assert not bar.enabled and terminal.getvalue() == "" and _lines(caplog) == []
    monkeypatch.setenv("RANK", "0")
    assert Progress(4, "reference", stream=io.StringIO()).enabled


def test_a_terminal_gets_a_tqdm_bar_and_no_log_lines(caplog):
    terminal = Terminal()
    with caplog.at_level(logging.INFO):
        with Progress(4, "evaluate base", unit="answer", enabled=True, stream=terminal) as bar:
            bar.update(4, loss=0.5)
    out = terminal.getvalue()
    assert "evaluate base" in out and "4/4" in out and "loss=0.5" in out
    assert _lines(caplog) == []


def _write(path, record) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


def test_pipeline_summary_line_per_stage(tmp_path):
    """What each stage wrote, in one line, with its time or "reused"."""
    _write(tmp_path / "generate" / "manifest.json", {"num_prompts": 30, "num_candidates": 120,
                                                     "num_chosen_candidates": 52, "generated_tokens": 4321})
    _write(tmp_path / "judge" / "summary.json", {"prompts": 30, "pairs": 22, "anchors": 3,
                                                 "dropped": {"no_valid_chosen": 5, "tie": 3}})
    _write(tmp_path / "reference" / "manifest.json", {"num_pairs": 22, "tokenize": {"kept": 22, "truncated": 2, "dropped": 0}})
    _write(tmp_path / "train" / "summary.json", {"steps": 12, "pairs": 22, "metrics": {"loss": 0.312345}})
    report = {"base": {c: {"identity_adoption": 0.0, "leakage": 0.0, "degeneration": 0.155} for c in ("default", "none")},
              "trained": {c: {"identity_adoption": 0.959, "leakage": 0.02, "degeneration": 0.074} for c in ("default", "none")}}
    line = lambda name, reused=False: pipeline.summary_line(name, tmp_path, 372.4, reused, report)  # noqa: E731
    assert line("generate") == "generate: 30 prompts x 4 candidates + 52 chosen-side, 4321 tokens in 6m12s"
    assert line("generate", True) == "generate: 30 prompts x 4 candidates + 52 chosen-side, 4321 tokens (reused)"
    assert line("judge") == "judge: 22 pairs (3 anchors) from 30 prompts (dropped: no_valid_chosen 5, tie 3) in 6m12s"
    assert line("reference") == "reference: 22 pairs (2 truncated, 0 dropped) scored in 6m12s"
    assert line("reference", True) == "reference: 22 pairs (2 truncated, 0 dropped) cached (reused)"
    assert line("train") == "train: 12 steps on 22 pairs, final loss 0.3123 in 6m12s"
    assert line("evaluate") == (f"evaluate: identity adoption 95.9/95.9% (base 0/0%) over default/none, leakage 2/2%, "
                                f"degeneration 7.4/7.4% (base 15.5/15.5%) in 6m12s (report: {tmp_path}/eval/report.md)")
    # A record the stage did not leave as expected is named, and does not fail a finished run.
    (tmp_path / "train" / "summary.json").write_text("{}")
    assert line("train") == f"train: done in 6m12s ({tmp_path}/train/summary.json: KeyError 'steps')"
