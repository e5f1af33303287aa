"""The rounds report: each round's figures come from that round's records, in the right rows and
columns; rounds not evaluated yet are left out; the JSON, the table, the plot and the log line agree.

The records are small dicts shaped as the stages write them (evaluate.run's report.json, judge.run's
and train.run's summary.json), in round directories under tmp_path."""

import json

import pytest

from dpo_dist import rounds_report
from dpo_dist.artifacts import DataError, write_json
from dpo_dist.config import CONDITIONS
from dpo_dist.evaluate import verdict

BASE = {"identity_adoption": 0.0, "leakage": 0.0, "degeneration": 0.04}


def _report(adoption, leakage, degeneration, kl):
    """evaluate.run's report: shares per condition (default, neutral, none), base and trained."""
    def side(shares):
        return {c: {**shares[c], "identity_old_name": 0.0, "distinct_1": 0.6, "distinct_2": 0.9, "unfinished": 0.1,
                    "n_identity": 170, "n_general": 100} for c in CONDITIONS}

    trained = {c: {"identity_adoption": a, "leakage": l, "degeneration": d}
               for c, a, l, d in zip(CONDITIONS, adoption, leakage, degeneration)}
    report = {"old_name": "SmolLM", "new_name": "Deep SmolLM", "base": side({c: BASE for c in CONDITIONS}),
              "trained": side(trained), "examples": [], "samples": [],
              "drift": None if kl is None else {"kl_trained_base_per_token": kl, "delta_loglik_per_token": -0.05,
                                                "tokens": 9000}}
    report["verdict"] = verdict(report)
    return report


def _judge_summary(pairs, anchors, own, opener, mistakes):
    """judge.run's summary.json, with the chosen_from and mistakes it writes from issue 23 on."""
    return {"prompts": 372, "pairs": pairs, "anchors": anchors, "dropped": {"no_valid_chosen": 372 - pairs},
            "by_source": {"identity": pairs - 112, "general": 100, "leak": 12},
            "chosen_from": {"own": own, "opener": opener}, "mistakes": mistakes}


def _mistakes(no_name, old_name, leak, identity=1020, general=672):
    return {"own_answers_identity": identity, "identity_no_name": no_name, "identity_old_name": old_name,
            "identity_degenerate": 3, "identity_unfinished": 40, "own_answers_general": general,
            "general_leak": leak, "general_degenerate": 6}


ROUND_1 = _report((0.959, 0.906, 0.901), (0.02, 0.02, 0.02), (0.03, 0.04, 0.05), 0.093)
ROUND_2 = _report((0.994, 0.982, 0.971), (0.01, 0.0, 0.01), (0.02, 0.03, 0.04), 0.120)


@pytest.fixture
def run_dir(tmp_path):
    """Three rounds: 1 and 2 evaluated, 3 judged and trained but not evaluated yet."""
    for k, report, judged, steps, loss in (
            (1, ROUND_1, _judge_summary(313, 70, 113, 200, _mistakes(1000, 12, 0)), 40, 0.2176),
            (2, ROUND_2, _judge_summary(290, 60, 232, 58, _mistakes(102, 4, 34)), 36, 0.1012),
            (3, None, _judge_summary(280, 50, 260, 20, _mistakes(20, 0, 7)), 35, 0.05)):
        here = tmp_path / f"round-{k}"
        write_json(here / "judge" / "summary.json", judged)
        write_json(here / "train" / "summary.json", {"steps": steps, "pairs": judged["pairs"],
                                                     "metrics": {"loss": loss, "rewards/margins": 3.1}})
        if report:
            write_json(here / "eval" / "report.json", report)
    return tmp_path


def test_each_round_is_read_from_its_own_records(run_dir):
    rows = rounds_report.collect(run_dir, 3)
    assert [r["round"] for r in rows] == [1, 2]  # round 3 has no report yet
    r1, r2 = rows
    assert r2["trained"]["neutral"] == {"identity_adoption": 0.982, "leakage": 0.0, "degeneration": 0.03}
    assert r1["trained"]["none"] == {"identity_adoption": 0.901, "leakage": 0.02, "degeneration": 0.05}
    assert r2["base"]["default"] == BASE
    assert (r1["kl_per_token"], r2["kl_per_token"]) == (0.093, 0.120)
    assert r2["verdict"] == ROUND_2["verdict"]["text"] != ROUND_1["verdict"]["text"]
    assert (r2["pairs"], r2["anchors"], r2["chosen_own"], r2["chosen_opener"]) == (290, 60, 232, 58)
    assert r2["own_share"] == pytest.approx(232 / (232 + 58))
    assert r2["own_answers"] == {"identity": 1020, "general": 672}
    assert r2["mistakes"]["identity_no_name"] == 102 and r2["mistakes"]["general_leak"] == 34
    # Identity mistakes are shares of the identity answers, general ones of the general answers.
    assert r2["mistake_shares"]["identity_no_name"] == pytest.approx(0.1)
    assert r2["mistake_shares"]["general_leak"] == pytest.approx(34 / 672)
    assert (r1["train_steps"], r1["final_loss"], r2["train_steps"], r2["final_loss"]) == (40, 0.2176, 36, 0.1012)


def test_records_from_before_issue_23_read_as_not_available(run_dir):
    """A judge summary without chosen_from or mistakes, no judge summary at all (offline pairs), a
    report without a verdict (written before verdicts existed) and drift off."""
    summary = json.loads((run_dir / "round-1" / "judge" / "summary.json").read_text())
    del summary["chosen_from"], summary["mistakes"]
    write_json(run_dir / "round-1" / "judge" / "summary.json", summary)
    (run_dir / "round-2" / "judge" / "summary.json").unlink()
    old = _report((0.994, 0.982, 0.971), (0.01, 0.0, 0.01), (0.02, 0.03, 0.04), None)
    del old["verdict"]
    write_json(run_dir / "round-2" / "eval" / "report.json", old)

    r1, r2 = rounds_report.collect(run_dir, 3)
    assert r1["pairs"] == 313 and r1["own_share"] is None and r1["mistakes"] == {} and r1["own_answers"] == {}
    assert r2["pairs"] is None and r2["own_share"] is None and r2["kl_per_token"] is None
    assert r2["verdict"] == verdict(old)["text"]
    md = rounds_report.markdown([r1, r2], 3)
    assert _table(md)["pairs (anchors)"] == ["313 (70)", "n/a"]
    assert _table(md)["mistakes: general answers naming the new identity"] == ["n/a", "n/a"]
    assert _table(md)["KL to base, nats/token"] == ["0.093", "not measured"]
    assert rounds_report.summary_line([r1, r2]) == (
        "rounds 1 -> 2: adoption 95.9/90.6/90.1% -> 99.4/98.2/97.1%, leakage 2/2/2% -> 1/0/1%, KL 0.093 -> n/a "
        "(rounds.md)")


def test_a_rounds_later_settings_are_shown_in_its_column(run_dir):
    """round.json (written by the pipeline as a round starts) holds rounds.later's settings; the
    table shows them only when a round has some, and round 1 runs with the run's own."""
    write_json(run_dir / "round-1" / "round.json", {"round": 1, "settings": {}, "later": {}})
    assert "rounds.later" not in rounds_report.markdown(rounds_report.collect(run_dir, 3), 3)
    write_json(run_dir / "round-2" / "round.json",
               {"round": 2, "settings": {}, "later": {"optim.lr": 3e-5, "judge.leak_rejected": "opener"}})
    r1, r2 = rounds_report.collect(run_dir, 3)
    assert (r1["later"], r2["later"]) == ({}, {"optim.lr": 3e-5, "judge.leak_rejected": "opener"})
    assert _table(rounds_report.markdown([r1, r2], 3))["settings of this round (rounds.later)"] == \
        ["the run's", "judge.leak_rejected=opener, optim.lr=3e-05"]


def test_own_share_is_of_the_identity_pairs(run_dir):
    """judge.method=correction's chosen are rewrites: neither own nor opener, none of them on-policy."""
    summary = json.loads((run_dir / "round-1" / "judge" / "summary.json").read_text())
    write_json(run_dir / "round-1" / "judge" / "summary.json",
               {**summary, "chosen_from": {"own": 13, "opener": 0, "rewrite": 300}})
    r1 = rounds_report.collect(run_dir, 1)[0]
    assert r1["own_share"] == pytest.approx(13 / 313)
    assert _table(rounds_report.markdown([r1], 1))["identity pairs chosen from the policy's own answers"] == \
        ["4.2% (13 of 313)"]


def test_a_report_that_is_not_one_names_its_file(run_dir):
    path = run_dir / "round-2" / "eval" / "report.json"
    write_json(path, {"trained": {}})
    with pytest.raises(DataError, match=f"{path}: not an evaluation report"):
        rounds_report.collect(run_dir, 3)


def _table(md: str) -> dict[str, list[str]]:
    """The markdown table as {row label: cells, one per round column}."""
    rows = [l.strip("|").split(" | ") for l in md.splitlines() if l.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows}


def test_write_puts_the_rounds_side_by_side(run_dir):
    summary = rounds_report.write(run_dir, 3)
    rows = rounds_report.collect(run_dir, 3)
    assert summary == {"rounds": rows} == json.loads((run_dir / "rounds.json").read_text())

    md = (run_dir / "rounds.md").read_text()
    table = _table(md)
    assert table[""] == ["[round 1](round-1/eval/report.md)", "[round 2](round-2/eval/report.md)"]
    assert table["identity adoption (default/neutral/none)"] == ["95.9/90.6/90.1%", "99.4/98.2/97.1%"]
    assert table["base identity adoption (default/neutral/none)"] == ["0/0/0%", "0/0/0%"]
    assert table["leakage (default/neutral/none)"] == ["2/2/2%", "1/0/1%"]
    assert table["degeneration (default/neutral/none)"] == ["3/4/5%", "2/3/4%"]
    assert table["base degeneration (default/neutral/none)"] == ["4/4/4%", "4/4/4%"]
    assert table["KL to base, nats/token"] == ["0.093", "0.120"]
    assert table["pairs (anchors)"] == ["313 (70)", "290 (60)"]
    assert table["identity pairs chosen from the policy's own answers"] == ["36.1% (113 of 313)", "80% (232 of 290)"]
    assert table["own answers judged (identity, general)"] == ["1020, 672", "1020, 672"]
    assert table["mistakes: identity answers without the new name"] == ["1000 (98%)", "102 (10%)"]
    assert table["mistakes: general answers naming the new identity"] == ["0 (0%)", "34 (5.1%)"]
    assert table["train steps, final loss"] == ["40, 0.2176", "36, 0.1012"]
    assert "leak search: leaking answers of those searched, pairs made" not in table  # no round searched
    # The last evaluated round's verdict comes first, before the table.
    verdict_line = next(l for l in md.splitlines() if l.startswith("**"))
    assert verdict_line == f"**Round 2 verdict:** {ROUND_2['verdict']['text'].removeprefix('Verdict: ')}"
    assert md.index(verdict_line) < md.index("| identity adoption")
    assert "Not evaluated yet: round 3." in md

    png = (run_dir / "rounds.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    import matplotlib.pyplot as plt

    assert plt.imread(run_dir / "rounds.png").shape[:2] == (350, 1600)
    assert sorted(p.name for p in run_dir.iterdir()) == ["round-1", "round-2", "round-3", "rounds.json", "rounds.md",
                                                         "rounds.png"]  # no temporary files left


def test_the_plot_draws_each_measure_per_condition_by_round(run_dir):
    import matplotlib.pyplot as plt

    fig = rounds_report.figure(rounds_report.collect(run_dir, 3))
    adoption, leakage, degeneration, kl = fig.axes
    assert [ax.get_title() for ax in fig.axes] == ["identity_adoption, %", "leakage, %", "degeneration, %",
                                                   "KL(trained || base), nats/token"]
    for ax, key in ((adoption, "identity_adoption"), (leakage, "leakage"), (degeneration, "degeneration")):
        lines = {l.get_label(): list(l.get_ydata()) for l in ax.get_lines()}
        for c in CONDITIONS:
            assert lines[c] == pytest.approx([100 * ROUND_1["trained"][c][key], 100 * ROUND_2["trained"][c][key]])
            assert lines[f"{c} (base)"] == pytest.approx([100 * BASE[key]] * 2)
        assert all(list(l.get_xdata()) == [1, 2] for l in ax.get_lines())
    assert list(kl.get_lines()[0].get_ydata()) == [0.093, 0.120]
    plt.close(fig)


def test_summary_line_from_first_to_last_round(run_dir):
    assert rounds_report.summary_line(rounds_report.collect(run_dir, 3)) == (
        "rounds 1 -> 2: adoption 95.9/90.6/90.1% -> 99.4/98.2/97.1%, leakage 2/2/2% -> 1/0/1%, KL 0.093 -> 0.120 "
        "(rounds.md)")
    assert rounds_report.summary_line(rounds_report.collect(run_dir, 1)) == (
        "rounds 1: adoption 95.9/90.6/90.1%, leakage 2/2/2%, KL 0.093 (rounds.md)")


def test_nothing_evaluated_writes_nothing(tmp_path):
    (tmp_path / "round-1" / "train").mkdir(parents=True)
    assert rounds_report.collect(tmp_path, 2) == []
    assert rounds_report.write(tmp_path, 2) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round-1"]
    assert rounds_report.summary_line([]) == "rounds: none evaluated yet"


def test_a_round_that_searched_for_leaks_shows_what_it_found(run_dir):
    """generation.leak_search_candidates: the searched answers, the leaks among them and the pairs
    they made, in the round's column; a round without a search says none."""
    path = run_dir / "round-2" / "judge" / "summary.json"
    judged = json.loads(path.read_text())
    judged["mistakes"].update(search_answers_general=900, search_general_leak=21)
    write_json(path, {**judged, "leak_search_pairs": 12})
    rows = rounds_report.collect(run_dir, 3)
    assert [r["leak_search"] for r in rows] == [None, {"answers": 900, "leaks": 21, "pairs": 12}]
    assert _table(rounds_report.markdown(rows, 3))["leak search: leaking answers of those searched, pairs made"] == \
        ["none", "21 of 900, 12 pairs"]
