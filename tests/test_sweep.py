"""`python -m dpo_dist.sweep` on sweeps of iterative rounds: each job's figures come from the round
asked for (the last by default), a job still in an earlier round says how far it got, the worst row
takes the lowest adoption and the highest leakage over the finished jobs, and a damaged record
names its file without hiding the other jobs. The records are small files shaped as Hydra and the
stages write them; tests/test_rounds.py runs a real multirun of the pipeline."""

import json

import pytest
import yaml

from dpo_dist import sweep
from dpo_dist.config import CONDITIONS


def _job(sweep_dir, name, overrides, num_rounds, rounds, only=0):
    """A job directory: Hydra's records, and per finished round a train summary and, when given
    figures, an evaluation report. ``rounds`` maps round -> (adoption, leakage) per condition or None."""
    job = sweep_dir / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"run_dir": str(job),
                                                                "rounds": {"num": num_rounds, "only": only}}))
    for k, figures in rounds.items():
        here = job / f"round-{k}" if num_rounds > 1 else job
        (here / "train").mkdir(parents=True)
        (here / "train" / "summary.json").write_text(json.dumps({"steps": 10 * k, "world_size": 1,
                                                                  "metrics": {"loss": 1.0 / k}}))
        if figures is not None:
            adoption, leakage = figures
            (here / "eval").mkdir()
            (here / "eval" / "report.json").write_text(json.dumps({
                "trained": {c: {"identity_adoption": a, "leakage": l, "degeneration": 0.01 * k}
                            for c, a, l in zip(CONDITIONS, adoption, leakage)},
                "drift": {"kl_trained_base_per_token": 0.1 * k}}))
    return job


@pytest.fixture
def seeds(tmp_path):
    """Three seeds of two rounds: seeds 0 and 1 finished, seed 2 still in round 2 (round 1 done)."""
    d = tmp_path / "sweep"
    _job(d, "0", ["generation.seed=0"], 2, {1: ((0.95, 0.90, 0.90), (0.02, 0.02, 0.02)),
                                            2: ((0.99, 0.98, 0.97), (0.04, 0.02, 0.01))})
    _job(d, "1", ["generation.seed=1"], 2, {1: ((0.96, 0.94, 0.94), (0.03, 0.03, 0.01)),
                                            2: ((0.91, 0.92, 0.85), (0.01, 0.01, 0.01))})
    _job(d, "2", ["generation.seed=2"], 2, {1: ((0.93, 0.91, 0.89), (0.00, 0.05, 0.00))})
    return d


def _rows(table: str) -> dict[str, list[str]]:
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return {cells[0]: dict(zip(header, cells)) for cells in
            ([c.strip() for c in line.strip("|").split("|")] for line in lines[1:])}


def test_each_seed_shows_its_last_round_and_the_worst_over_the_finished_ones(seeds, capsys):
    assert sweep.main([str(seeds)]) == 0
    table = capsys.readouterr().out
    rows = _rows(table)
    assert [rows[j]["round"] for j in "012"] == ["2 of 2", "2 of 2", "1 of 2 done"]
    assert [rows[j]["steps"] for j in "012"] == ["20", "20", "unfinished"]
    assert rows["0"]["adoption/default"] == "0.99" and rows["1"]["adoption/none"] == "0.85"
    assert rows["0"]["leakage/default"] == "0.04" and rows["0"]["kl_per_token"] == "0.2"
    # Seed 2 has no round-2 figures: the worst is over seeds 0 and 1, figure by figure.
    worst = rows["worst of 0, 1 (2 of 3 evaluated)"]
    assert [worst[f"adoption/{c}"] for c in CONDITIONS] == ["0.91", "0.92", "0.85"]
    assert [worst[f"leakage/{c}"] for c in CONDITIONS] == ["0.04", "0.02", "0.01"]
    assert worst["loss"] == "" and worst["steps"] == ""
    assert "3 runs, 2 finished." in table


def test_round_flag_picks_an_earlier_round_for_every_job(seeds, capsys):
    assert sweep.main([str(seeds), "--round", "1"]) == 0
    rows = _rows(capsys.readouterr().out)
    assert [rows[j]["round"] for j in "012"] == ["1 of 2"] * 3
    worst = rows["worst"]  # every job's
    assert [worst[f"adoption/{c}"] for c in CONDITIONS] == ["0.93", "0.9", "0.89"]
    assert [worst[f"leakage/{c}"] for c in CONDITIONS] == ["0.03", "0.05", "0.02"]
    got = {r["job"]: r for r in sweep.collect(seeds, 3)}
    assert got["0"]["round"] == "none (2 rounds)" and not got["0"]["finished"]
    assert sweep.main([str(seeds), "--round", "0"]) == 2


def test_single_round_jobs_read_as_before(tmp_path, capsys):
    d = tmp_path / "sweep"
    for j, beta in enumerate(("0.05", "0.1")):
        _job(d, str(j), [f"loss.beta={beta}"], 1, {1: None})
    assert sweep.main([str(d)]) == 0
    table = capsys.readouterr().out
    assert "| job | loss.beta | steps | loss |" in table
    assert "worst" not in table and "2 runs, 2 finished." in table  # no evaluation figures to take a worst of


def test_a_damaged_record_names_its_file_and_the_other_jobs_still_show(seeds, capsys):
    report = seeds / "1" / "round-2" / "eval" / "report.json"
    report.write_text('{"trained": {"default": ')
    (seeds / "2" / ".hydra" / "config.yaml").write_text("rounds: [unclosed\n")
    assert sweep.main([str(seeds)]) == 0
    out = capsys.readouterr().out
    rows = _rows(out)
    assert rows["0"]["adoption/default"] == "0.99"
    assert rows["1"]["steps"] == "unreadable" and rows["2"]["steps"] == "unreadable"
    assert f"job 1: {report}: unreadable (JSONDecodeError" in out
    assert f"job 2: {seeds / '2' / '.hydra' / 'config.yaml'}: unreadable (" in out
    assert "worst" not in out  # one readable finished job: nothing to compare


def test_the_worst_compares_seeds_of_one_setting_not_settings(tmp_path, capsys):
    """beta x seed: one worst row per beta, over its seeds only, with the beta in its column."""
    d = tmp_path / "sweep"
    figures = {("0.05", 0): 0.99, ("0.05", 1): 0.97, ("0.1", 0): 0.80, ("0.1", 1): 0.90}
    for j, ((beta, seed), adoption) in enumerate(figures.items()):
        _job(d, str(j), [f"loss.beta={beta}", f"generation.seed={seed}", f"train.seed={seed}"], 1,
             {1: ((adoption,) * 3, (0.01,) * 3)})
    assert sweep.main([str(d)]) == 0
    rows = _rows(capsys.readouterr().out)
    assert rows["worst of 0, 1"]["loss.beta"] == "0.05" and rows["worst of 0, 1"]["adoption/none"] == "0.97"
    assert rows["worst of 2, 3"]["loss.beta"] == "0.1" and rows["worst of 2, 3"]["adoption/none"] == "0.8"
    assert rows["worst of 0, 1"]["generation.seed"] == ""


def test_a_job_of_one_round_of_several_is_read_at_that_round(tmp_path):
    """slurm/pipeline.sbatch runs round k as `rounds.only=k`: such a job is finished at round k."""
    d = tmp_path / "sweep"
    _job(d, "0", ["rounds.only=1"], 2, {1: ((0.9,) * 3, (0.02,) * 3)}, only=1)
    (row,) = sweep.collect(d)
    assert row["round"] == "1 of 2" and row["finished"] and row["metrics"]["adoption/none"] == 0.9
    (d / "0" / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"rounds": {"num": "${oc.env:N}"}}))
    (row,) = sweep.collect(d)
    assert row["error"] == f"{d / '0' / '.hydra' / 'config.yaml'}: rounds.num='${{oc.env:N}}' is not a number of rounds"


@pytest.mark.parametrize("data", [{"pairs": "runs/smollm2-135m/round-1/judge/pairs.jsonl"},  # a train-only sweep
                                  {}])  # a stage run alone with the default pairs (an evaluate sweep)
def test_a_job_of_the_demo_model_that_ran_one_round_is_read_in_its_directory(tmp_path, data):
    """The demo model's file sets rounds.num=2, which a train-only sweep on your own pairs (one round:
    config.num_rounds) and a stage run alone (no round-1/) do not run: their figures are in the job
    directory, and the table must not send them looking in round-2/."""
    d = tmp_path / "sweep"
    job = _job(d, "0", ["loss.beta=0.1"], 1, {1: ((0.9,) * 3, (0.02,) * 3)})
    config = {"run_dir": "runs/smollm2-135m", "rounds": {"num": 2, "only": 0}}
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump({**config, "data": data} if data else config))
    if data:  # a round-1/ beside it: the own pairs alone must make it one round
        (job / "round-1").mkdir()
    (row,) = sweep.collect(d)
    assert row["finished"] and "round" not in row and row["metrics"]["adoption/none"] == 0.9, row
