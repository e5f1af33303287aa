"""What a pipeline process still holds after training: the pipeline evaluates next in the same
process, and starts the next round's generation after that (on a GPU, vLLM in a child process that
wants `generation.gpu_memory_utilization` of each GPU free). Training's weights, gradients,
optimizer states and DeepSpeed's flat partitions must all be gone, at every ZeRO stage. On the CPU
the same objects hold host memory: every tensor still reachable from Python is counted after
train.run returns (tests/live_after_train.py) and must be a small fraction of the model."""

import shutil

import pytest

from launch import run_script, tagged_lines, write_identity_pairs

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]

# The bundled model in fp32: 135M parameters, 540 MB of weights alone.
MODEL_BYTES = 134_515_008 * 4
TRAIN = ["loss=dpo", "train.global_batch_size=4", "train.micro_batch_size=2", "train.max_steps=1",
         "wandb.mode=disabled", "data.max_length=96", "data.max_prompt_length=64"]


def train_in_process(tmp_path, nproc: int, deepspeed: str, *flags: str, errors: bool = False) -> list[dict]:
    """tests/live_after_train.py's line for each rank; an error on any rank fails the test unless
    ``errors``. With ``errors`` a rank left alone in a collective times out after 2 minutes (the
    failure those tests are about), not 30."""
    pairs = write_identity_pairs(tmp_path / "pairs.jsonl")
    out = run_script("live_after_train.py", [*flags, f"run_dir={tmp_path / 'run'}", f"data.pairs={pairs}",
                                             f"deepspeed={deepspeed}", *TRAIN], nproc=nproc,
                     env={"DPO_DIST_TIMEOUT_MIN": "2"} if errors else None)
    ranks = tagged_lines(out, "LIVE")
    assert sorted(r["rank"] for r in ranks) == list(range(nproc)), out[-3000:]
    assert errors or not any(r["error"] for r in ranks), out[-6000:]
    return ranks


@pytest.mark.parametrize("nproc,deepspeed", [(1, "zero2"), (2, "zero2"), (2, "zero3")])
def test_nothing_of_training_stays_alive_in_the_process(tmp_path, nproc, deepspeed):
    for r in train_in_process(tmp_path, nproc, deepspeed):
        # Left alive: small buffers (rotary tables, the reference log-probs); a parameter copy is 540 MB.
        assert r["after"] - r["before"] < 0.02 * MODEL_BYTES, r
        # Training's SIGTERM handler only sets a flag for its loop; after it, SIGTERM must end the process.
        assert r["signals_restored"] and r["exit"] is None, r


def test_a_signal_during_the_export_stops_every_rank_after_it(tmp_path):
    """SIGUSR1 to rank 0 as the export begins (Slurm's warning before the time limit): the export and
    the summary are written, then every rank stops with the preemption exit code (124, requeue)
    instead of going on into the next stage, with the handlers before training back in place."""
    from dpo_dist.train import EXIT_PREEMPTED

    ranks = train_in_process(tmp_path, 2, "zero2", "--signal-during-export")
    assert [r["exit"] for r in ranks] == [EXIT_PREEMPTED] * 2 and all(r["signals_restored"] for r in ranks), ranks
    assert (tmp_path / "run" / "train" / "final" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "train" / "summary.json").is_file()


def test_a_finished_training_is_reused_on_every_rank_when_one_rank_cannot_see_its_summary(tmp_path):
    """Rank 0 decides whether training already finished and every rank follows: a rank on a node whose
    view of the shared run directory lags (no train/summary.json yet) must not start training alone,
    to wait in DeepSpeed's first collective for ranks that have returned."""
    first = train_in_process(tmp_path, 2, "zero2")
    export = tmp_path / "run" / "train" / "final" / "model.safetensors"
    written = export.stat().st_mtime_ns
    again = train_in_process(tmp_path, 2, "zero2", "--summary-unseen-by-rank-1")
    # Rank 0's (the summary's): another rank's own throughput figures differ.
    written_metrics = next(r["metrics"] for r in first if r["rank"] == 0)
    assert [r["metrics"] for r in again] == [written_metrics] * 2 and written_metrics, (first, again)
    assert all(r["exit"] is None for r in again), again
    assert export.stat().st_mtime_ns == written  # reused, not trained and exported again


def test_the_reference_log_probs_reach_every_rank_when_one_rank_cannot_see_their_manifest(tmp_path):
    """Rank 0 reads the reference cache and gives every rank its log-probs: a rank whose view of the
    shared run directory lags (no reference/manifest.json yet) must not fail alone with a stale-cache
    error while the others wait in DeepSpeed's first collective."""
    train_in_process(tmp_path, 2, "zero2")
    shutil.rmtree(tmp_path / "run" / "train")  # train again on the cached reference log-probs
    again = train_in_process(tmp_path, 2, "zero2", "--reference-unseen-by-rank-1", errors=True)
    assert [r["error"] for r in again] == [None, None], again
    assert all(r["metrics"] for r in again), again


@pytest.mark.parametrize("flag", ["--pairs-fewer-on-rank-1", "--pairs-text-differs-on-rank-1"])
def test_a_rank_that_read_other_pairs_stops_every_rank_naming_the_file(tmp_path, flag):
    """Every rank reads the pairs file itself; one that read another version of it (its node sees the
    shared file late) would score and cache other pairs under rank 0's fingerprint, where a later run
    reuses them (the same ids with another text), or fail alone (a pair fewer). Every rank stops
    before the reference pass, naming the file, and no cache is written."""
    ranks = train_in_process(tmp_path, 2, "zero2", flag, errors=True)
    assert not (tmp_path / "run" / "reference" / "logps.safetensors").exists()
    assert not (tmp_path / "run" / "train" / "final").exists()
    pairs = str(tmp_path / "pairs.jsonl")
    assert all(r["error"] and r["error"].startswith(f"StaleReference: {pairs}: rank(s) [1] read other training pairs")
               for r in ranks), ranks


def test_pairs_rewritten_between_the_reference_pass_and_training_stop_every_rank(tmp_path):
    """The reference log-probs are of the records the reference pass read; training reads the file
    again, and a version written in between (the same ids, another text) would train on log-probs of
    other answers. Every rank stops, naming the file, before training."""
    ranks = train_in_process(tmp_path, 2, "zero2", "--pairs-change-before-training", errors=True)
    assert (tmp_path / "run" / "reference" / "logps.safetensors").exists()
    assert not (tmp_path / "run" / "train" / "final").exists()
    pairs = str(tmp_path / "pairs.jsonl")
    assert all(r["error"] and r["error"].startswith(f"StaleReference: {pairs}: changed since its reference log-probs")
               for r in ranks), ranks


def test_a_rank_that_cannot_read_the_pairs_stops_every_rank(tmp_path):
    """A rank whose read of the pairs file fails (a half-written file on its node) stops with its
    own error, and the others with one naming that rank, instead of waiting in a collective."""
    ranks = sorted(train_in_process(tmp_path, 2, "zero2", "--pairs-unreadable-on-rank-1", errors=True),
                   key=lambda r: r["rank"])
    pairs = str(tmp_path / "pairs.jsonl")
    assert ranks[0]["error"].startswith(f"StaleReference: {pairs}: rank 1 could not read it: "), ranks
    assert ranks[1]["error"].startswith("DataError: "), ranks
