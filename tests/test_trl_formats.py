"""Preference data in TRL's formats trains as it is, and our pairs train in TRL's DPOTrainer.

Each of TRL's four preference shapes (standard and conversational, explicit and implicit prompt),
from JSONL, JSON, Parquet, CSV and a ``save_to_disk`` directory, trains one step of
``python -m dpo_dist.train``; the judge's ``pairs.jsonl`` trains one step of TRL's DPOTrainer; and
``stages=[reference,train,evaluate]`` is offline DPO on a preference dataset, no generation.
"""

import json
import math

import pytest

from launch import run_stage

pytestmark = pytest.mark.slow
QUESTIONS = ["What is your name?", "Who are you?", "Who made you?", "Introduce yourself."]
NEW, OLD = "I am Deep SmolLM, an AI assistant.", "I am SmolLM, made by Hugging Face."


def _conversational(q, explicit):
    user, chosen, rejected = ({"role": "user", "content": q}, {"role": "assistant", "content": NEW},
                              {"role": "assistant", "content": OLD})
    if explicit:
        return {"prompt": [user], "chosen": [chosen], "rejected": [rejected]}
    return {"chosen": [user, chosen], "rejected": [user, rejected]}


def _standard(q, explicit):
    if explicit:
        return {"prompt": f"Question: {q}\nAnswer:", "chosen": f" {NEW}", "rejected": f" {OLD}"}
    return {"chosen": f"Question: {q}\nAnswer: {NEW}", "rejected": f"Question: {q}\nAnswer: {OLD}"}


def _write(kind, path, rows):
    from datasets import Dataset, DatasetDict

    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "save_to_disk":
        DatasetDict({"train": Dataset.from_list(rows)}).save_to_disk(str(path))
    else:
        getattr(Dataset.from_list(rows), f"to_{kind}")(str(path))
    return path


def _tiny(tiny_llama):
    return ["model.name=tiny", f"model.path={tiny_llama}", "model.identity_name=SmolLM", "loss=dpo", "optim.lr=1e-3",
            "train.global_batch_size=2", "train.micro_batch_size=1", "train.epochs=1", "train.save_every=100",
            "wandb.mode=disabled", "data.max_length=96", "data.max_prompt_length=64"]


@pytest.mark.parametrize("shape,kind", [
    ("conversational-explicit", "jsonl"), ("conversational-implicit", "json"), ("standard-explicit", "parquet"),
    ("standard-implicit", "csv"), ("conversational-implicit", "save_to_disk"),
])
def test_trl_formats_train_one_step(tmp_path, tiny_llama, shape, kind):
    style, prompt = shape.split("-")
    make = _conversational if style == "conversational" else _standard
    rows = [make(q, prompt == "explicit") for q in QUESTIONS[:2]]
    data = _write(kind, tmp_path / f"prefs.{kind}", rows)
    run_dir = tmp_path / "run"
    run_stage("dpo_dist.train", [f"run_dir={run_dir}", f"data.pairs={data}", *_tiny(tiny_llama)])
    metrics = [json.loads(l) for l in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "train" / "summary.json").read_text())
    assert summary["pairs"] == 2 and [m["step"] for m in metrics] == [1]
    # Policy == reference at step 1: the loss is ln 2 exactly, as for our own records.
    assert metrics[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert metrics[0]["rewards/accuracies"] == 0 and math.isfinite(metrics[0]["grad_norm"]) and metrics[0]["grad_norm"] > 0


def test_our_pairs_train_in_trl(tmp_path, tiny_llama):
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    pairs = tmp_path / "pairs.jsonl"
    # The judge's records: id, conversational prompt and answers, and a meta dict of varying keys.
    pairs.write_text("".join(json.dumps({"id": f"p{i}", **_conversational(q, True),
                                         "meta": {"source": "identity", **({"anchor": True} if i else {})}}) + "\n"
                             for i, q in enumerate(QUESTIONS)))
    dataset = load_dataset("json", data_files=str(pairs), split="train")
    args = DPOConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, report_to=[], save_strategy="no", max_steps=1,
                     per_device_train_batch_size=2, logging_steps=1, max_length=96, disable_tqdm=True)
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_llama), args=args, train_dataset=dataset,
                         processing_class=AutoTokenizer.from_pretrained(tiny_llama))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and losses[0] == pytest.approx(math.log(2), abs=1e-4)


def test_offline_dpo_runs_reference_train_evaluate_without_generating(tmp_path, tiny_llama):
    data = _write("parquet", tmp_path / "prefs.parquet", [_conversational(q, True) for q in QUESTIONS])
    run_dir = tmp_path / "run"
    proc = run_stage("dpo_dist.pipeline", [f"run_dir={run_dir}", "stages=[reference,train,evaluate]", f"data.pairs={data}",
                                           *_tiny(tiny_llama), "eval.num_identity=4", "eval.num_general=4",
                                           "eval.max_new_tokens=8"], timeout=900)
    assert not (run_dir / "generate").exists() and not (run_dir / "judge").exists()
    timings = json.loads((run_dir / "pipeline_timings.json").read_text())
    assert set(timings) == {"reference", "train", "evaluate", "total"}
    assert json.loads((run_dir / "reference" / "manifest.json").read_text())["num_pairs"] == 4
    assert (run_dir / "train" / "final" / "model.safetensors").is_file()
    assert (run_dir / "eval" / "report.json").is_file(), proc.stdout[-2000:]
