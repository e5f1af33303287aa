"""Stage 3: reference log-probs, computed once, sharded across ranks, merged and cached.

    python -m dpo_dist.reference run_dir=runs/demo
    torchrun --nproc_per_node=2 -m dpo_dist.reference run_dir=runs/demo

Each rank scores a contiguous shard of the pairs (chosen and rejected summed response log-probs)
in training's own layout, ``train.reference_batch_size`` pairs per prefix-shared row (each prompt
once, no padding, the vocabulary projection only where a response token is predicted, 128 rows at a
time below ZeRO-3), and writes a shard file; rank 0 checks that every pair appears
exactly once and merges them into ``reference/logps.safetensors``. The cache is keyed by a
fingerprint of (reference model, pairs file, tokenisation settings): a matching cache is reused, a
stale one is recomputed and never read, and one that no longer matches the digest its manifest
recorded (truncated, altered) is rebuilt with a warning. Training then needs only the policy in memory.

Under ``deepspeed.stage=3`` the reference model is partitioned across ranks with ZeRO-3 (for
models that do not fit one device); otherwise each rank holds a plain eval copy.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from dpo_dist import attention, dist, fused, memory
from dpo_dist.artifacts import (DataError, UserError, atomic_path, fingerprint, intact, manifest_matches,
                                outputs_record, read_json, records_fingerprint, reusable, shard_path, write_json)
from dpo_dist.cli import one_line, stage_main
from dpo_dist.config import Config
from dpo_dist.data import (TokenizedPair, collate_shared_prompt, mirror_anchors, load_pairs,
                           tokenize_pairs)
from dpo_dist.losses import packed_sequence_logps, sum_by_sequence
from dpo_dist.models import load_model, load_tokenizer, model_fingerprint, torch_dtype
from dpo_dist.progress import Progress

log = logging.getLogger(__name__)


class StaleReference(UserError, RuntimeError):
    pass


def cache_fingerprint(cfg: Config, pairs: str | None = None) -> str:
    """``pairs``: the records' ``records_fingerprint`` when the caller has read them (the records
    the cache is computed from, not a later read of the file); read here otherwise."""
    data = {"max_prompt_length": cfg.data.max_prompt_length, "max_length": cfg.data.max_length,
            "truncation": cfg.data.truncation}
    # The records as loaded, not the file: the same data fingerprints alike from JSONL, Parquet, a
    # save_to_disk directory or the hub, and split, column mapping and skipped rows are in it.
    pairs = pairs or records_fingerprint(load_pairs(cfg.data))
    return fingerprint(model_fingerprint(cfg.model_for("reference")), pairs, data)


def reference_dir(cfg: Config) -> Path:
    return Path(cfg.run_dir) / "reference"


def packed_logps(model, batch: dict, num_sequences: int, fused_head: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs and token counts of each sequence of a prefix-shared row
    (data.collate_shared_prompt), for the reference pass and for training; an anchor's rejected
    side, left out of the row, gets its chosen side's. ``fused_head``: the vocabulary projection a
    chunk of rows at a time from the final hidden states, inside the head's forward (any ZeRO stage).
    The model's attention is ``attention.use_pair_blocks``' (set when it was prepared)."""
    if not attention.uses_pair_blocks(model):
        # Otherwise the layers would ignore `segments` and silently compute the whole dense mask.
        raise ValueError("packed_logps: the model's attention is not pair-block attention; call "
                         "attention.use_pair_blocks(model) when preparing it")
    inputs = {k: batch[k] for k in ("input_ids", "position_ids", "attention_mask")}
    inputs.update(logits_to_keep=batch["logit_positions"], segments=attention.segments_of(batch))
    if fused_head and fused.head_supported(model):
        with fused.head_returns_token_logps(model, batch["labels"]):
            token_logps = model(**inputs).logits
        logps, lengths = sum_by_sequence(token_logps[0], batch["sequence_index"], num_sequences)
    else:
        logits = model(**inputs).logits
        logps, lengths = packed_sequence_logps(logits[0], batch["labels"], batch["sequence_index"], num_sequences)
    return mirror_anchors(logps, batch["anchor"]), mirror_anchors(lengths, batch["anchor"])


@torch.no_grad()
def score_pairs(model, pairs: list[TokenizedPair], batch_size: int, num_batches: int = 0,
                filler: TokenizedPair | None = None, fused_head: bool = True,
                progress: Callable[[int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs of chosen and rejected, each (len(pairs),) float32.

    Pairs are packed ``batch_size`` at a time, in length order, into one prefix-shared row
    (data.collate_shared_prompt), as training scores them; they are returned in input order. A
    packed row costs attention over its whole length, so small groups are fastest: on the bundled
    model 2 pairs per row took 30 s where the stacked, padded layout with full logits took 49 s
    (120 pairs) and 4 per row 35 s. ``fused_head`` as in ``packed_logps``. Under ZeRO-3 every
    rank must run the same number of forward passes (parameter gathers are collective):
    ``num_batches`` extends the loop with forwards on ``filler`` whose results are discarded.
    ``progress(n)`` is called with the number of pairs each batch scored."""
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i].prompt_ids) + len(pairs[i].chosen_ids) + len(pairs[i].rejected_ids))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    chosen = torch.zeros(len(pairs), dtype=torch.float32)
    rejected = torch.zeros(len(pairs), dtype=torch.float32)
    dev = dist.device()
    dtype = next(model.parameters()).dtype
    attention.use_pair_blocks(model)  # once, for the model's life (attention.py says why)
    for b in range(max(len(batches), num_batches)):
        idx = batches[b] if b < len(batches) else []
        group = [pairs[i] for i in idx] if idx else [filler]
        batch = {k: v.to(dev) for k, v in collate_shared_prompt(group, dtype).items()}
        n = len(group)
        logps, _ = packed_logps(model, batch, 2 * n, fused_head)
        if idx:
            chosen[idx] = logps[:n].float().cpu()
            rejected[idx] = logps[n:].float().cpu()
            if progress:
                progress(len(idx))
    return chosen, rejected


def run(cfg: Config) -> Path:
    """Compute (or reuse) the reference cache; returns the merged safetensors path."""
    return ensure(cfg).path


@dataclass(frozen=True)
class Cache:
    path: Path  # the merged log-probs
    fingerprint: str  # training keys its own on it
    pairs: str  # records_fingerprint of the records it was computed from (training checks it read them)


def ensure(cfg: Config) -> Cache:
    """``run``, also returning what training needs to know of the cache: the pairs and a later
    round's reference weights are hashed once, not again in training."""
    denv = dist.init()
    records, pairs_fp = read_pairs_on_every_rank(cfg)
    out_dir = reference_dir(cfg)
    merged, manifest = out_dir / "logps.safetensors", out_dir / "manifest.json"
    # Rank 0 judges the cache and every rank follows: a damaged file is reported (and rebuilt) once.
    def judge_cache() -> tuple[str, bool]:
        fp = cache_fingerprint(cfg, pairs_fp)
        return fp, _reusable(manifest, merged, fp)

    fp, reuse = dist.on_main(judge_cache)
    if reuse:
        log.info("reference log-probs: reusing %s (fingerprint %s)", merged, fp)
        return Cache(merged, fp, pairs_fp)

    tokenizer = load_tokenizer(cfg.model)
    pairs, stats = tokenize_pairs(records, tokenizer, cfg.data)
    shard = dist.shard_range(len(pairs), denv.rank, denv.world_size)
    mine = shard_path(out_dir, fp, denv.rank, denv.world_size, ".safetensors")
    zero3 = cfg.deepspeed.stage == 3 and denv.world_size > 1

    t0 = time.time()
    need = not intact(mine, lambda p: _check_shard(load_file(str(p)), shard))
    if zero3:  # ranks of a ZeRO-3 model compute together or not at all
        need = any(dist.all_gather_object(need))
    resident = {}
    if need:
        chosen, rejected, resident = _score_shard(cfg, [pairs[i] for i in shard], zero3, filler=pairs[0] if pairs else None)
        with atomic_path(mine) as tmp:
            save_file({"chosen": chosen, "rejected": rejected,
                       "index": torch.tensor(list(shard), dtype=torch.long)}, str(tmp))
    else:
        log.info("rank %d: reusing finished shard %s", denv.rank, mine)
    resident = dist.all_gather_object(resident)
    dist.barrier()

    # On rank 0, its error (shards that do not cover every pair) raised on every rank.
    dist.on_main(lambda: _merge(out_dir, fp, [p.id for p in pairs], denv.world_size, merged, manifest, stats,
                                time.time() - t0, resident, cfg.model_for("reference").path))
    return Cache(merged, fp, pairs_fp)


def read_pairs_on_every_rank(cfg: Config) -> tuple[list[dict], str]:
    """The pairs file's records as this rank read them, and their ``records_fingerprint``, the same on
    every rank. Every rank reads the file itself. One that read another version of it (its node sees
    the shared file late, or the file was rewritten under a running job) would score, cache and
    train on other pairs under rank 0's fingerprint; one that cannot read it (a half-written file)
    would fail alone while the others wait in the next collective. The ranks compare what they
    read, and every rank stops alike, naming the file."""
    try:
        records = load_pairs(cfg.data)
        mine = (True, records_fingerprint(records))
    except Exception as e:  # noqa: BLE001 -- raised below, on every rank
        error, mine = e, (False, one_line(e))
    outcomes = dist.all_gather_object(mine)
    failed = [(r, text) for r, (ok, text) in enumerate(outcomes) if not ok]
    if failed:
        if not mine[0]:
            raise error
        rank, text = failed[0]
        raise StaleReference(f"{cfg.data.pairs}: rank {rank} could not read it: {text}")
    digests = [d for _, d in outcomes]
    if len(set(digests)) > 1:
        differ = [r for r, d in enumerate(digests) if d != digests[0]]
        raise StaleReference(f"{cfg.data.pairs}: rank(s) {differ} read other training pairs than rank 0 "
                             f"(a shared filesystem showing another version of the file to their node?)")
    return records, digests[0]


def _reusable(manifest: Path, merged: Path, fp: str) -> bool:
    if reusable(manifest, fp, [merged]):
        return True
    with contextlib.suppress(DataError, OSError):  # no manifest, or an unreadable one (reusable said so)
        recorded = read_json(manifest).get("fingerprint")
        if recorded != fp:
            log.warning("reference log-probs at %s are stale (fingerprint %s != %s): recomputing", merged, recorded, fp)
    return False


def _check_shard(part: dict, shard: range) -> None:
    """A reused shard file holds this rank's pairs (``load_file`` raises first if it is damaged)."""
    if part["index"].tolist() != list(shard) or any(part[k].shape != (len(shard),) for k in ("chosen", "rejected")):
        raise ValueError(f"holds pairs {part['index'].tolist()[:3]}..., not this rank's {shard}")


def _score_shard(cfg: Config, shard: list[TokenizedPair], zero3: bool,
                 filler: TokenizedPair | None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """This rank's reference log-probs, and its resident memory (GiB) before the model loads, after
    scoring and after the model is torn down. The model lives only inside this call: training loads
    the policy next, and at 72B two resident models do not fit."""
    resident = {"before_load": memory.current_bytes()}
    model = _load_reference_model(cfg, dist.env().world_size)
    # Under ZeRO-3 every forward gathers every layer's weights from all ranks: packing more pairs per
    # forward divides that traffic, at the cost of a longer row.
    batch_size = cfg.train.reference_pairs_per_forward(zero3)
    num_batches = max(dist.all_gather_object(-(-len(shard) // batch_size))) if zero3 else 0
    # Rank 0's shard stands for the whole: every rank scores an equal share.
    with Progress(len(shard), "reference", unit="pair") as bar:
        chosen, rejected = score_pairs(model, shard, batch_size, num_batches, filler=filler,
                                       fused_head=cfg.train.fused_ops, progress=bar.update)
    resident["after_scoring"] = memory.current_bytes()
    dist.release_model(model)
    del model
    dist.free_memory()
    resident["after_release"] = memory.current_bytes()
    return chosen, rejected, {k: round(v / memory.GIB, 3) for k, v in resident.items()}


def _load_reference_model(cfg: Config, world_size: int):
    if cfg.deepspeed.stage != 3 or world_size == 1:
        return load_model(cfg.model_for("reference"), device=dist.device()).eval()
    # ZeRO-3 inference: built already partitioned across ranks (no rank loads the whole model) and
    # gathered layer by layer in the forward pass. DeepSpeed places the partitions: no device here.
    ds_cfg = dist.zero3_inference_config(torch_dtype(cfg.model.dtype))
    with dist.zero3_model_loading(cfg.deepspeed, ds_cfg):
        model = load_model(cfg.model_for("reference")).eval()
    engine = dist.build_engine(model, None, None, ds_cfg)
    dist.end_zero3_model_loading()
    engine.eval()
    return engine


def _merge(out_dir: Path, fp: str, ids: list[str], world_size: int, merged: Path, manifest: Path, stats, seconds: float,
           resident: list[dict], model: str) -> None:
    n = len(ids)
    chosen = torch.full((n,), float("nan"))
    rejected = torch.full((n,), float("nan"))
    seen = torch.zeros(n, dtype=torch.long)
    for r in range(world_size):
        part = load_file(str(shard_path(out_dir, fp, r, world_size, ".safetensors")))
        chosen[part["index"]] = part["chosen"]
        rejected[part["index"]] = part["rejected"]
        seen[part["index"]] += 1
    if not torch.all(seen == 1):
        bad = [ids[i] for i in torch.nonzero(seen != 1).flatten().tolist()[:5]]
        raise RuntimeError(f"reference shards do not cover every pair exactly once (e.g. {bad})")
    with atomic_path(merged) as tmp:
        save_file({"chosen": chosen, "rejected": rejected}, str(tmp))
    write_json(manifest, {"fingerprint": fp, "model": model, "ids": ids, "num_pairs": n, "world_size": world_size,
                          "tokenize": {"kept": stats.kept, "truncated": stats.truncated, "dropped": stats.dropped},
                          "seconds": round(seconds, 2), "resident_gib_per_rank": resident, **outputs_record(merged)})
    log.info("reference log-probs: %d pairs merged from %d shard(s) into %s", n, world_size, merged)


def load(cfg: Config, pair_ids: list[str], fp: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The cached reference log-probs for these pairs, refusing a stale or mismatched cache. ``fp``
    is the fingerprint rank 0 computed and broadcast; the ranks have compared the pairs they read
    (``read_pairs_on_every_rank``), so rank 0's ids are every rank's.

    Rank 0 reads and checks the cache and gives every rank the tensors (8 bytes a pair, CPU float32):
    a rank on a node that sees the shared run directory late (NFS attribute caching) would read no
    manifest, or the one before, and fail alone while the others wait in DeepSpeed's first
    collective."""
    return dist.on_main(lambda: _read(cfg, pair_ids, fp))


def _read(cfg: Config, pair_ids: list[str], fp: str) -> tuple[torch.Tensor, torch.Tensor]:
    out_dir = reference_dir(cfg)
    manifest = out_dir / "manifest.json"
    if not manifest_matches(manifest, fp):
        raise StaleReference(f"{manifest}: no reference cache for fingerprint {fp}; run `python -m dpo_dist.reference` "
                             f"with the same model and data settings")
    ids = read_json(manifest)["ids"]
    if ids != pair_ids:
        raise StaleReference(f"{manifest}: the cached pair ids differ from the training pairs")
    merged = out_dir / "logps.safetensors"
    if not reusable(manifest, fp, [merged], quiet=True):  # damaged since `run` checked it
        raise StaleReference(f"{merged}: damaged; run `python -m dpo_dist.reference` again to rebuild it")
    t = load_file(str(merged))
    return t["chosen"], t["rejected"]


main = stage_main(run)

if __name__ == "__main__":
    main()
