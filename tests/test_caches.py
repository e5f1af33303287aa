"""Caches a stage can trust: what the model fingerprint identifies (file content, the resolved dtype,
a hub snapshot), that the content hash is computed once per file version, and that a damaged output
of every stage -- and a damaged converted bundled model -- is rebuilt with a warning, never read."""

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dpo_dist import artifacts, evaluate, generate, judge, models, reference
from dpo_dist.config import ModelConfig, compose
from launch import write_identity_pairs


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A DPO_DIST_CACHE of the test's own, and a count of the files actually hashed."""
    monkeypatch.setenv("DPO_DIST_CACHE", str(tmp_path / "cache"))
    hashed = []
    real = artifacts.file_digest

    def counting(path):
        hashed.append(os.path.basename(path))
        return real(path)

    monkeypatch.setattr(artifacts, "file_digest", counting)
    return hashed


def _model_dir(path, weights=b"\x01" * 4096):
    """A directory resolve_model_path accepts: model_fingerprint reads files, not models."""
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "llama"}')
    (path / "tokenizer.json").write_text('{"version": "1.0"}')
    (path / "model.safetensors").write_bytes(weights)
    (path / "README.md").write_text("not loaded, not fingerprinted")
    return path


def _fp(path, **kw):
    return models.model_fingerprint(ModelConfig(name="t", path=str(path), identity_name="T", **kw))


# ---------------------------------------------------------------- fingerprint: file content

@pytest.mark.parametrize("records", [[], [{"id": "a"}], [{"id": "é", "n": 1.5, "x": [1, {"b": None}]}, {"id": "b", "p": Path("/x")}]])
def test_records_hashed_one_at_a_time_fingerprint_as_the_whole_list(records):
    """reference caches made before are reused: the streamed digest is the list's fingerprint."""
    assert artifacts.records_fingerprint(iter(records)) == artifacts.fingerprint(records)
    assert artifacts.records_fingerprint(records[:-1]) != artifacts.fingerprint(records) or not records


def test_content_is_hashed_once_per_file_version_and_the_fingerprint_follows_content(tmp_path, cache):
    model = _model_dir(tmp_path / "model")
    first = _fp(model)
    assert sorted(cache) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert set(first["files"]) == {"config.json", "model.safetensors", "tokenizer.json"}

    cache.clear()
    assert _fp(model) == first and cache == []  # unchanged files: every digest from the cache

    weights = model / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 5 * 10**9))  # touched: same bytes
    assert _fp(model) == first and cache == ["model.safetensors"]  # hashed again, same fingerprint

    cache.clear()
    copy = tmp_path / "copy"
    shutil.copytree(model, copy)  # copy2: times preserved
    assert _fp(copy) == first  # the same files elsewhere are the same model
    assert sorted(cache) == ["config.json", "model.safetensors", "tokenizer.json"]

    # A same-sized checkpoint copied over the old one in place with its time kept (cp -p, rsync -t):
    # size, mtime to the nanosecond and inode all unchanged. The bytes differ, so must the fingerprint.
    st = weights.stat()
    with open(weights, "r+b") as f:
        f.write(b"\x02" * 4096)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = weights.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)
    changed = _fp(model)
    assert changed["files"]["model.safetensors"] != first["files"]["model.safetensors"]
    assert changed != first


def test_a_digest_index_that_cannot_be_read_is_rebuilt(tmp_path, cache, caplog):
    model = _model_dir(tmp_path / "model")
    first = _fp(model)
    index = models.cache_dir() / "file_digests.json"
    index.write_text(index.read_text()[:40])  # truncated
    cache.clear()
    with caplog.at_level(logging.WARNING):
        assert _fp(model) == first
    assert f"{index} cannot be read" in caplog.text and len(cache) == 3
    cache.clear()
    assert _fp(model) == first and cache == []  # rebuilt: the next look-up hits again


# ---------------------------------------------------------------- fingerprint: dtype

def test_dtype_is_fingerprinted_resolved(tmp_path, cache, monkeypatch):
    """dtype=auto is float32 on the CPU and bfloat16 on a GPU: a CPU cache is the float32 run's,
    and not the one a bf16 GPU run may reuse."""
    model = _model_dir(tmp_path / "model")
    cpu_auto = _fp(model, dtype="auto")
    assert cpu_auto == _fp(model, dtype="float32") and cpu_auto["dtype"] == "torch.float32"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu_auto = _fp(model, dtype="auto")
    assert gpu_auto == _fp(model, dtype="bfloat16") and gpu_auto != cpu_auto


# ---------------------------------------------------------------- fingerprint: hub snapshots

@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An offline Hugging Face cache with one repository; ``commit(sha, weights)`` adds a snapshot
    and points refs/main at it, as a download of a new revision does."""
    from huggingface_hub import constants

    root = tmp_path / "hf-hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(models, "_SNAPSHOTS", {})
    repo = root / "models--acme--tiny"

    def commit(sha: str, weights: bytes):
        blob = repo / "blobs" / sha
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(weights)
        snap = repo / "snapshots" / sha
        snap.mkdir(parents=True)
        (snap / "config.json").write_text('{"model_type": "llama"}')
        (snap / "model.safetensors").symlink_to(blob)  # as the hub cache links snapshots to blobs
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(sha)
        models._SNAPSHOTS.clear()  # a new process
        return snap

    return commit


def test_a_hub_id_fingerprints_its_snapshot(hub, cache):
    """model.allow_download with a hub id resolves to the snapshot it downloads (here: finds), so
    the fingerprint holds its files: a new revision with other weights is another model, one with
    the same weights the same."""
    a = hub("a" * 40, b"\x01" * 64)
    first = _fp("acme/tiny", allow_download=True)
    assert models.resolve_model_path(ModelConfig(path="acme/tiny", allow_download=True)) == str(a)
    assert set(first["files"]) == {"config.json", "model.safetensors"}
    assert _fp("acme/tiny") == first  # from the local cache without allow_download: the same snapshot
    hub("b" * 40, b"\x02" * 64)
    assert _fp("acme/tiny", allow_download=True) != first
    hub("c" * 40, b"\x01" * 64)
    assert _fp("acme/tiny", allow_download=True) == first


# ---------------------------------------------------------------- the reference cache, end to end

@pytest.fixture
def pairs_run(tmp_path, tiny_llama):
    pairs = write_identity_pairs(tmp_path / "pairs.jsonl")

    def cfg(model_dir, *extra):
        return compose([f"model.path={model_dir}", f"data.pairs={pairs}", f"run_dir={tmp_path / 'run'}",
                        "data.max_prompt_length=64", "data.max_length=96", *extra])

    return cfg


def test_reference_cache_is_reused_for_the_same_weights_and_recomputed_for_others(tmp_path, cache, pairs_run,
                                                                                   tiny_llama, caplog, monkeypatch):
    scored = []
    real = reference._score_shard
    monkeypatch.setattr(reference, "_score_shard", lambda *a, **k: scored.append(1) or real(*a, **k))
    reference.run(pairs_run(tiny_llama))
    first = {k: v.clone() for k, v in load_file(str(tmp_path / "run" / "reference" / "logps.safetensors")).items()}
    assert scored == [1]

    copy = tmp_path / "copy"
    shutil.copytree(tiny_llama, copy)  # times kept
    reference.run(pairs_run(copy))
    assert scored == [1], "the same weights at another path were scored again"

    # Other weights of the same size, copied in place with the old time: recomputed.
    weights = copy / "model.safetensors"
    st = weights.stat()
    trained = load_file(str(weights))
    trained = {k: v + 0.05 for k, v in trained.items()}
    from safetensors.torch import save_file
    save_file(trained, str(tmp_path / "trained.safetensors"), metadata={"format": "pt"})
    assert (tmp_path / "trained.safetensors").stat().st_size == st.st_size
    with open(weights, "r+b") as f:
        f.write((tmp_path / "trained.safetensors").read_bytes())
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    with caplog.at_level(logging.WARNING):
        reference.run(pairs_run(copy))
    assert scored == [1, 1] and "are stale" in caplog.text
    second = load_file(str(tmp_path / "run" / "reference" / "logps.safetensors"))
    assert not torch.equal(first["chosen"], second["chosen"])


# ---------------------------------------------------------------- damaged outputs, stage by stage

def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def test_reference_rebuilds_a_damaged_cache_with_a_warning(tmp_path, cache, pairs_run, tiny_llama, caplog, monkeypatch):
    """A truncated logps.safetensors under a manifest that still matches: training died reading it
    (SafetensorError). It is rebuilt from the finished shards, and a damaged shard is scored again."""
    cfg = pairs_run(tiny_llama)
    scored = []
    real = reference._score_shard
    monkeypatch.setattr(reference, "_score_shard", lambda *a, **k: scored.append(1) or real(*a, **k))
    merged = reference.run(cfg)
    fp = reference.cache_fingerprint(cfg)
    ids = [f"p{i:02d}" for i in range(12)]
    # Cloned: load_file maps the file, and the truncation below happens in place.
    chosen, rejected = (t.clone() for t in reference.load(cfg, ids, fp))

    _truncate(merged)
    with caplog.at_level(logging.WARNING):
        reference.run(cfg)
    assert all(torch.equal(a, b) for a, b in zip(reference.load(cfg, ids, fp), (chosen, rejected)))
    assert f"{merged} does not match the digest its manifest recorded" in caplog.text
    assert scored == [1]  # merged again from the shard, not scored again

    caplog.clear()
    shard = next((tmp_path / "run" / "reference" / "shards").glob("*.safetensors"))
    _truncate(shard)
    _truncate(merged)
    with caplog.at_level(logging.WARNING):
        reference.run(cfg)
    assert all(torch.equal(a, b) for a, b in zip(reference.load(cfg, ids, fp), (chosen, rejected)))
    assert f"{shard} cannot be read" in caplog.text and scored == [1, 1]


GEN = ["generation=hf", "prompts.num_train=3", "prompts.num_train_general=0", "prompts.num_train_leak=0",
       "generation.num_candidates=2", "generation.max_new_tokens=4", "generation.chosen_prefixes={}"]


def test_generate_rebuilds_damaged_candidates_and_shards_with_a_warning(tmp_path, cache, tiny_llama, caplog, monkeypatch):
    cfg = compose([f"model.path={tiny_llama}", f"run_dir={tmp_path / 'run'}", *GEN])
    engines = []
    real = generate.make_backend
    monkeypatch.setattr(generate, "make_backend", lambda *a: engines.append(1) or real(*a))
    merged = generate.run(cfg)
    original = merged.read_text()
    assert len(original.splitlines()) == 3 and engines == [1]

    merged.write_text(original.replace('"text": "', '"text": "x', 1))  # altered, still valid JSON
    with caplog.at_level(logging.WARNING):
        generate.run(cfg)
    assert merged.read_text() == original and engines == [1]  # merged again from the shard
    assert f"{merged} does not match the digest" in caplog.text

    caplog.clear()
    shard = next((tmp_path / "run" / "generate" / "shards").glob("*.jsonl"))
    _truncate(shard)
    _truncate(merged)
    with caplog.at_level(logging.WARNING):
        generate.run(cfg)
    assert merged.read_text() == original  # seeded sampling: the same candidates again
    assert f"{shard} cannot be read" in caplog.text and engines == [1, 1]


def _candidates(path):
    rows = [{"id": f"q{i}-default", "messages": [{"role": "user", "content": "Who are you?"}], "condition": "default",
             "source": "identity", "question": "Who are you?", "lang": "en",
             "candidates": [{"text": "I am Deep SmolLM, an AI assistant.", "finished": True, "num_tokens": 9},
                            {"text": "I am SmolLM.", "finished": True, "num_tokens": 5}]} for i in range(4)]
    path.parent.mkdir(parents=True)
    artifacts.write_jsonl(path, rows)


def test_judge_rebuilds_damaged_pairs_with_a_warning(tmp_path, caplog):
    _candidates(tmp_path / "run" / "generate" / "candidates.jsonl")
    cfg = compose([f"run_dir={tmp_path / 'run'}"])
    pairs = judge.run(cfg)
    original = pairs.read_text()
    assert len(original.splitlines()) == 4
    _truncate(pairs)
    with caplog.at_level(logging.WARNING):
        judge.run(cfg)
    assert pairs.read_text() == original and f"{pairs} does not match the digest" in caplog.text

    caplog.clear()
    pairs.unlink()
    with caplog.at_level(logging.WARNING):
        judge.run(cfg)
    assert pairs.read_text() == original and f"{pairs} is missing" in caplog.text


EVAL = ["eval.backend=hf", "eval.num_identity=2", "eval.num_general=2", "eval.max_new_tokens=4"]


def test_evaluate_rebuilds_damaged_answers_report_and_drift_sums_with_a_warning(tmp_path, cache, tiny_llama, caplog,
                                                                                monkeypatch):
    cfg = compose([f"model.path={tiny_llama}", f"eval.trained_path={tiny_llama}", f"run_dir={tmp_path / 'run'}", *EVAL])
    answered = []
    real = evaluate.answer
    monkeypatch.setattr(evaluate, "answer", lambda *a: answered.append(1) or real(*a))
    first = evaluate.run(cfg)
    assert answered == [1]  # base and trained are the same weights: one set of answers
    eval_dir = tmp_path / "run" / "eval"
    report = eval_dir / "report.json"
    cached = next((models.cache_dir() / "eval").glob("*.json"))
    shared = eval_dir / "answers" / cached.name
    drift = next((eval_dir / "shards").glob("*.json"))

    _truncate(report)
    _truncate(shared)
    body = json.loads(cached.read_text())
    body["answers"][0]["text"] = "I am Deep SmolLM."  # altered, still valid JSON
    cached.write_text(json.dumps(body))
    _truncate(drift)
    with caplog.at_level(logging.WARNING):
        second = evaluate.run(cfg)
    assert second == first
    for damaged in (report, shared, drift):
        assert f"{damaged} cannot be read" in caplog.text, damaged
    assert f"{cached}: cached answers damaged (the answers do not match their recorded digest)" in caplog.text
    assert answered == [1]  # answers merged again from the shards
    assert json.loads(cached.read_text())["answers"] == json.loads(shared.read_text())["answers"]


# ---------------------------------------------------------------- the converted bundled model

@pytest.fixture
def bundled(tmp_path, cache, tiny_llama, monkeypatch):
    """bundled:qwen-test with a builder that copies the tiny model (the real build takes seconds;
    what is checked is what happens around it), counting the builds."""
    builds = []

    def build(out_dir):
        builds.append(1)
        for f in tiny_llama.iterdir():
            shutil.copy(f, out_dir / f.name)

    monkeypatch.setattr(models, "_bundled_builder", lambda name: build)
    return compose(["model=qwen-test"]).model, builds


def test_a_damaged_bundled_model_is_rebuilt_with_a_warning(bundled, caplog):
    cfg, builds = bundled
    path = models.resolve_model_path(cfg)
    weights = os.path.join(path, "model.safetensors")
    assert builds == [1] and models.resolve_model_path(cfg) == path and builds == [1]
    models.load_model(cfg)

    with caplog.at_level(logging.WARNING):
        _truncate(Path(weights))
        assert models.resolve_model_path(cfg) == path
    assert builds == [1, 1] and "['model.safetensors'] truncated or altered; rebuilding it" in caplog.text
    models.load_model(cfg)

    caplog.clear()
    os.remove(os.path.join(path, "tokenizer.json"))
    with caplog.at_level(logging.WARNING):
        models.resolve_model_path(cfg)
    assert builds == [1, 1, 1] and "missing ['tokenizer.json']" in caplog.text
    models.load_tokenizer(cfg)

    caplog.clear()
    st = os.stat(weights)  # same size and time, other bytes
    with open(weights, "r+b") as f:
        f.seek(st.st_size - 8)
        f.write(b"\xff" * 8)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    with caplog.at_level(logging.WARNING):
        models.resolve_model_path(cfg)
    assert builds == [1, 1, 1, 1] and "truncated or altered" in caplog.text
