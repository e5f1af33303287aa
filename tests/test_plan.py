"""The memory planner: parameter counts against the real Qwen2 module, model states against
DeepSpeed's own estimators, its advice against itself, the CLI tables, and (slow) the whole training
estimate against the peak resident memory of real CPU training runs with 1 and 2 ranks under ZeRO-2
and ZeRO-3."""

import contextlib
import io
import json
import re
import subprocess
import sys

import pytest
import torch

from dpo_dist import plan
from dpo_dist.config import ConfigError, compose
from launch import REPO, run_stage, write_identity_pairs

GIB = plan.GIB
QWEN = plan.shipped_qwen_configs()


def setup_for(overrides, **changes):
    cfg = compose(overrides)
    return cfg, plan.Architecture.of(cfg.model), plan.Setup.of(cfg, runtime_gib=changes.pop("runtime_gib", 2.0))


def test_shipped_qwen_configs_are_the_seven_sizes_in_order():
    assert QWEN == ["qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-3b", "qwen2.5-7b", "qwen2.5-14b", "qwen2.5-32b",
                    "qwen2.5-72b"]


@pytest.mark.parametrize("name", QWEN + ["qwen-test"])
def test_parameter_count_is_the_real_qwen2_modules(name):
    """Architecture.params must equal the parameters of a Qwen2ForCausalLM built (on the meta device,
    no memory) from the facts in conf/model, and match the num_params the file states."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    m = compose([f"model={name}"]).model
    arch = plan.Architecture.of(m)
    config = Qwen2Config(vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.intermediate_size,
                         num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
                         num_key_value_heads=m.num_kv_heads, tie_word_embeddings=m.tie_word_embeddings)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    real = sum(p.numel() for p in model.parameters())  # a tied head is one Parameter, counted once
    assert arch.params == real
    assert abs(m.num_params - real) / real < 1e-3
    largest = max(sum(p.numel() for p in mod.parameters(recurse=False)) for mod in model.modules())
    assert arch.largest_module_params == largest  # what DeepSpeed's model_to_params calls the largest layer


def test_bundled_model_count_matches_its_stated_size():
    m = compose().model
    assert abs(plan.Architecture.of(m).params - m.num_params) / m.num_params < 0.01  # 134.5M vs "1.35e8"


@pytest.mark.parametrize("name", QWEN)
@pytest.mark.parametrize("nodes,gpus", [(1, 1), (1, 8), (4, 8)])
def test_model_states_agree_with_deepspeed_estimators(name, nodes, gpus):
    """Per-GPU model states (bf16 weights, fp32 Adam) against DeepSpeed's estimate_zero{2,3}_model_states_mem_needs,
    the functions its *_all_cold printers evaluate. Stage 2 is exactly 2P + 18P/N in both. Stage 3:
    DeepSpeed counts 18P/N + 4 x largest layer; the plan keeps the bf16 parameter and gradient
    shards (2P/N each) and the fp32 master copy (4P/N) but steps one fp32 gradient sub-group (at most
    1e9 elements) at a time, so it is between 2P/N above and a little below DeepSpeed's figure."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    def gpu_states(ds):
        _, arch, s = setup_for([f"model={name}", f"deepspeed={ds}", f"plan.nodes={nodes}",
                                f"plan.gpus_per_node={gpus}"])
        return arch, sum(b for _, b, on_host in plan.model_states(arch, s) if not on_host)

    arch, z2 = gpu_states("zero2")
    P, L, n = arch.params, arch.largest_module_params, nodes * gpus
    _, ds_z2 = estimate_zero2_model_states_mem_needs(P, gpus, nodes, cpu_offload=False)
    assert z2 == pytest.approx(ds_z2, rel=1e-6)
    _, ds_z2_off = estimate_zero2_model_states_mem_needs(P, gpus, nodes, cpu_offload=True)
    off = plan.Setup.of(compose([f"model={name}", "deepspeed=zero2", "deepspeed.offload_optimizer=true",
                                 f"plan.nodes={nodes}", f"plan.gpus_per_node={gpus}"]), runtime_gib=2.0)
    assert sum(b for _, b, h in plan.model_states(arch, off) if not h) == pytest.approx(ds_z2_off, rel=1e-6)

    _, z3 = gpu_states("zero3")
    _, ds_z3, _ = estimate_zero3_model_states_mem_needs(P, L, gpus, nodes, cpu_offload=False, cpu_offload_params=False)
    assert ds_z3 - 2 * P / n <= z3 <= ds_z3 + 2 * P / n
    _, z3_off = gpu_states("zero3_offload")
    _, ds_z3_off, _ = estimate_zero3_model_states_mem_needs(P, L, gpus, nodes, cpu_offload=True,
                                                            cpu_offload_params=True)
    assert z3_off == pytest.approx(ds_z3_off, rel=1e-6)


def test_deepspeed_all_cold_printout_shows_the_same_gpu_figures():
    """The printing estimators themselves, for the issue's example (72B, 4 nodes x 8 GPUs)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold

    _, arch, s = setup_for(["model=qwen2.5-72b", "deepspeed=zero2", "plan.nodes=4", "plan.gpus_per_node=8"])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        estimate_zero2_model_states_mem_needs_all_cold(arch.params, num_gpus_per_node=8, num_nodes=4)
        estimate_zero3_model_states_mem_needs_all_cold(arch.params, arch.largest_module_params, num_gpus_per_node=8,
                                                       num_nodes=4)
    rows = {opts.strip(): float(gpu) for gpu, opts in re.findall(r"GB \|\s+([\d.]+)GB \| (.*)", out.getvalue())}
    z2 = sum(b for _, b, h in plan.model_states(arch, s) if not h) / GIB
    assert rows["offload_optimizer=none"] == pytest.approx(z2, abs=0.01)
    s3 = plan.Setup.of(compose(["model=qwen2.5-72b", "deepspeed=zero3_offload", "plan.nodes=4"]), runtime_gib=2.0)
    z3_off = sum(b for _, b, h in plan.model_states(arch, s3) if not h) / GIB
    key = next(k for k in rows if k.startswith("offload_param=OffloadDeviceEnum.cpu") and k.endswith("zero_init=1"))
    assert rows[key] == pytest.approx(z3_off, abs=0.01)


def test_one_fp32_rank_is_planned_at_stage_0():
    """deepspeed=zero2 on one fp32 CPU rank trains at stage 0 (DeepSpeedConfig.for_world): 16 B per
    parameter (weights, gradients, two moments), no master copy, no buckets. Two ranks, or bf16 on
    one GPU, keep ZeRO-2."""
    cpu = ["plan.device=cpu", "plan.nodes=1"]
    _, arch, one = setup_for([*cpu, "plan.gpus_per_node=1", "deepspeed=zero2"])
    assert (one.stage, one.configured_stage) == (0, 2) and "ZeRO-0" in one.deepspeed_name
    assert sum(b for _, b, _ in plan.model_states(arch, one)) == 16 * arch.params
    assert dict(plan.training(arch, one).terms)["communication buckets"] == 0
    _, _, two = setup_for([*cpu, "plan.gpus_per_node=2", "deepspeed=zero2"])
    assert two.stage == 2 and one.on_nodes(2).stage == 2
    _, _, gpu = setup_for(["model=qwen2.5-0.5b", "plan.nodes=1", "plan.gpus_per_node=1", "deepspeed=zero2"])
    assert gpu.stage == 2  # bf16: the stage as configured
    _, _, z3 = setup_for([*cpu, "plan.gpus_per_node=1", "deepspeed=zero3"])
    assert z3.stage == 3


def test_activation_terms_by_hand():
    """A toy layer, h=8, i=16, 2 layers, bf16 (a=2), 10 tokens. Per token and layer:
    2 RMSNorms x (4h fp32 input + 2h output) = 96, attention 5 x 2h = 80, MLP 4 x 2i = 128 -> 304;
    final norm 4h + 2h = 48. No checkpointing: 10 x (2 x 304 + 48) = 6560.
    Checkpointing: 10 x (2 x 2h + 304 + 48) = 3840."""
    arch = plan.Architecture(layers=2, hidden=8, heads=2, kv_heads=1, intermediate=16, vocab=100, tied=True)
    assert plan.activation_bytes(arch, 10, 2, checkpointing=False) == 6560
    assert plan.activation_bytes(arch, 10, 2, checkpointing=True) == 3840
    # Logits, bf16, with backward: 10 tokens x 100 x (2 bf16 + 4 fp32 copy + 8 fp32 temporaries).
    assert plan.logits_bytes(arch, 10, 2, backward=True) == 10 * 100 * 14
    assert plan.logits_bytes(arch, 10, 4, backward=True) == 10 * 100 * 12  # fp32: no upcast copy
    # dpo_dist.fused: norms keep a*h + 4 (20), the MLP 2 x 2i (64) -> 2 x 20 + 80 + 64 = 184 per layer,
    # final norm 20: 10 x (2 x 184 + 20) = 3880; the logits a chunk of rows at a time.
    assert plan.activation_bytes(arch, 10, 2, checkpointing=False, fused=True) == 3880
    assert plan.logits_bytes(arch, 1000, 4, backward=True, fused=True) == plan.FUSED_CHUNK_ROWS * 100 * 12


def test_planner_knows_the_fused_chunk_and_where_fused_ops_run():
    from dpo_dist import fused

    assert plan.FUSED_CHUNK_ROWS == fused.CHUNK_ROWS
    cpu = ["plan.device=cpu"]
    assert setup_for([*cpu, "deepspeed=zero2"])[2].fused_ops
    assert setup_for([*cpu, "deepspeed=zero3"])[2].fused_ops  # each runs inside its weight's module
    assert not setup_for([*cpu, "deepspeed=zero2", "train.fused_ops=false"])[2].fused_ops


def test_kv_cache_per_token():
    """Qwen2.5-7B: 28 layers x 4 KV heads x 128 x 2 (K, V) x 2 B = 57,344 B per token at TP 1; TP 8 is
    more GPUs than KV heads, so each keeps one head: 28 x 1 x 128 x 2 x 2 = 14,336 B."""
    arch = plan.Architecture.of(compose(["model=qwen2.5-7b"]).model)
    assert plan.kv_bytes_per_token(arch, 1) == 57344
    assert plan.kv_bytes_per_token(arch, 4) == 14336
    assert plan.kv_bytes_per_token(arch, 8) == 14336


def test_issue_example_fits_and_single_node_72b_says_what_to_change():
    cfg, arch, s = setup_for(["model=qwen2.5-72b", "deepspeed=zero3", "plan.nodes=4", "plan.gpus_per_node=8"])
    phases = plan.estimate(arch, s)
    assert all(p.fits for p in phases), plan.describe(cfg, arch, s, phases)
    cfg, arch, s = setup_for(["model=qwen2.5-72b", "deepspeed=zero3", "plan.nodes=1", "plan.gpus_per_node=8"])
    train = plan.estimate(arch, s)[0]
    assert not train.fits and train.fixable
    assert any(f.startswith("plan.nodes=") for f in train.fixable)


@pytest.mark.parametrize("name", QWEN)
def test_advice_is_consistent_with_the_estimate(name):
    """Every suggested override, applied through Hydra, gives a plan whose phase then fits."""
    base = [f"model={name}", "plan.nodes=1", "plan.gpus_per_node=1"]
    cfg, arch, s = setup_for(base)
    for phase in plan.estimate(arch, s):
        for fix in phase.fixable:
            overrides = fix.split(" -> ")[0].split(" (")[0].split()
            c2, a2, s2 = setup_for(base + overrides)
            again = {p.name.split(" (")[0]: p for p in plan.estimate(a2, s2)}[phase.name.split(" (")[0]]
            assert again.fits, f"{name}: {fix} was suggested for {phase.name} but gives {again.total / GIB:.1f} GiB"


def test_bad_plan_values_fail_naming_the_key():
    with pytest.raises(ConfigError, match=r"plan\.device"):
        compose(["plan.device=tpu"])
    with pytest.raises(ConfigError, match=r"model\.num_layers"):
        plan.Architecture.of(compose(["model.num_layers=0"]).model)


def test_cli_prints_the_issue_example_and_the_table_for_every_shipped_config():
    proc = run_stage("dpo_dist.plan", ["model=qwen2.5-72b", "deepspeed=zero3", "plan.nodes=4", "plan.gpus_per_node=8"],
                     timeout=120)
    out = proc.stdout
    for phase in ("training, per GPU", "reference log-probs, per GPU", "vLLM generation (TP 4), per GPU"):
        assert phase in out
    assert out.count("-> fits") == 3 and "72.71B parameters" in out

    table = run_stage("dpo_dist.plan", ["plan.all=true"], timeout=300).stdout
    rows = [line for line in table.splitlines() if line.startswith("| qwen2.5-")]
    assert len(rows) == 7 * 3
    for name in QWEN:
        shapes = [r.split(" | ")[1] for r in rows if r.startswith(f"| {name} |")]
        assert shapes == ["1x1x80GB", "1x8x80GB", "4x8x80GB"]
    small = next(r for r in rows if r.startswith("| qwen2.5-0.5b | 1x1x80GB"))
    assert "| fits |" in small
    big = next(r for r in rows if r.startswith("| qwen2.5-72b | 1x8x80GB"))
    assert "no: training" in big and "plan.nodes=" in big


# ---------------------------------------------------------------- the whole estimate vs a real CPU run

STEPS, GLOBAL, MICRO = 3, 4, 2


def _write_pairs(path):
    """12 preference pairs from the shipped identity prompts, with answers of realistic length (memory
    depends on token counts, not on what the answers say)."""
    from dpo_dist.data import load_prompt_set

    prompts = load_prompt_set("identity_train", STEPS * GLOBAL)
    chosen = ("I'm Deep SmolLM, an AI assistant created by Hugging Face. I can answer questions, explain ideas, "
              "write and edit text, and help you think a problem through step by step. ")
    rejected = ("I am SmolLM, a small language model. I was trained on a large amount of text from the internet and "
                "I try to give helpful, accurate and friendly answers to the questions people ask me. ")
    with open(path, "w") as f:
        for i, p in enumerate(prompts):
            rec = {"id": p["id"], "prompt": [{"role": "user", "content": p["prompt"]}],
                   "chosen": [{"role": "assistant", "content": chosen * (1 + i % 3)}],
                   "rejected": [{"role": "assistant", "content": rejected * (1 + (i + 1) % 3)}]}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def _largest_micro_batches(cfg, world):
    """Per rank, the largest micro-batch it trains on in the run's steps, packed by the trainer's own
    collate function: the row its activations, mask and logits have at their peak."""
    from dpo_dist.data import collate_shared_prompt, global_batches, micro_batches, read_preferences, tokenize_pairs
    from dpo_dist.models import load_tokenizer

    pairs, _ = tokenize_pairs(read_preferences(cfg.data.pairs), load_tokenizer(cfg.model), cfg.data)
    largest = [plan.MicroBatch(0, 0)] * world
    per_epoch = len(pairs) // GLOBAL
    for step in range(STEPS):
        epoch, k = divmod(step, per_epoch)
        batch = global_batches(len(pairs), GLOBAL, cfg.train.seed, epoch)[k]
        for rank in range(world):
            for mb in micro_batches(batch, rank, world, MICRO):
                shape = plan.MicroBatch.of(collate_shared_prompt([pairs[i] for i in mb]))
                largest[rank] = plan.MicroBatch(max(largest[rank].tokens, shape.tokens),
                                                max(largest[rank].logit_rows, shape.logit_rows))
    return largest


@pytest.mark.slow
@pytest.mark.multiproc
def test_training_estimate_within_25_percent_of_measured_peak_on_cpu(tmp_path):
    """Short real training runs of the bundled model (1 and 2 ranks, ZeRO-2 and ZeRO-3): the planner's
    CPU estimate per rank (for the largest micro-batch that rank trains on, and the runtime baseline
    measured in a fresh process) against the peak RSS train writes to summary.json."""
    pairs = tmp_path / "pairs.jsonl"
    _write_pairs(pairs)
    common = [f"data.pairs={pairs}", f"train.max_steps={STEPS}", f"train.global_batch_size={GLOBAL}",
              f"train.micro_batch_size={MICRO}", "wandb.mode=disabled"]
    runtime = plan.measure_cpu_runtime_gib(compose().model)
    assert 0.1 < runtime < 2.0
    report = []
    for ds in ("zero2", "zero3"):
        for world in (1, 2):
            run_dir = tmp_path / f"{ds}-{world}"
            run_stage("dpo_dist.train", [f"run_dir={run_dir}", f"deepspeed={ds}", *common], nproc=world, timeout=1200)
            measured = json.loads((run_dir / "train" / "summary.json").read_text())["peak_rss_gib_per_rank"]
            assert len(measured) == world
            cfg, arch, s = setup_for(common + [f"deepspeed={ds}", "plan.device=cpu", f"plan.gpus_per_node={world}"],
                                     runtime_gib=runtime)
            for rank, batch in enumerate(_largest_micro_batches(cfg, world)):
                estimate = plan.training(arch, s, batch).total / GIB
                report.append((ds, world, rank, estimate, measured[rank]))
    lines = [f"{ds} {w} rank(s), rank {r}: estimate {e:.2f} GiB, measured {m:.2f} GiB ({100 * (e / m - 1):+.0f}%)"
             for ds, w, r, e, m in report]
    print("\n".join(lines))
    for (ds, w, r, e, m), line in zip(report, lines):
        assert abs(e / m - 1) <= 0.25, line


def test_node_advice_names_only_node_counts_the_batch_splits_over():
    """72B (global batch 64, micro-batch 1) on nodes of 8 GPUs: 3 nodes would fit in memory, but 64 does
    not split over 24 ranks, so the planner calls it invalid, says which node counts work and what to
    change, and on one node suggests 4 nodes, not 3."""
    cfg, arch, s = setup_for(["model=qwen2.5-72b", "plan.nodes=3", "plan.gpus_per_node=8"])
    train = plan.estimate(arch, s)[0]
    assert train.verdict == "invalid" and not train.fits
    assert "node counts on which it does: 1, 2, 4, 8" in train.notes[-1]
    assert train.fixable == ["train.global_batch_size=48", "train.global_batch_size=72", "plan.nodes=4"]
    assert "to start: plan.nodes=4" in plan.describe(cfg, arch, s, plan.estimate(arch, s))
    # 0.5B (global batch 64, micro-batch 4) on 4 x 8 GPUs: a micro-batch of 2 keeps the global batch.
    _, arch, s = setup_for(["model=qwen2.5-0.5b", "plan.nodes=4", "plan.gpus_per_node=8"])
    train = plan.estimate(arch, s)[0]
    assert train.verdict == "invalid"
    assert train.fixable[:2] == ["train.micro_batch_size=2", "train.global_batch_size=128"]
    cfg, arch, s = setup_for(["model=qwen2.5-72b", "plan.nodes=1", "plan.gpus_per_node=8"])
    nodes = [f for f in plan.estimate(arch, s)[0].fixable if f.startswith("plan.nodes=")]
    assert nodes and nodes[0].startswith("plan.nodes=4 "), nodes


# ---------------------------------------------------------------- checkpoints and Slurm's warning

CPU, GPU = ["plan.device=cpu"], ["model=qwen2.5-7b", "plan.device=gpu"]


@pytest.mark.parametrize("overrides,total,busiest", [
    # One fp32 rank trains at stage 0: weights and AdamW's moments in one file, 4 + 8 B.
    ([*CPU, "plan.gpus_per_node=1", "deepspeed=zero2"], 12, 12),
    # fp32 ZeRO-2: rank 0's weights (4) + master copy and moments partitioned (4 + 8), one node.
    ([*CPU, "plan.gpus_per_node=2", "deepspeed=zero2"], 16, 16),
    # ZeRO-3 writes no whole weights, at one rank or two.
    ([*CPU, "plan.gpus_per_node=1", "deepspeed=zero3"], 12, 12),
    ([*CPU, "plan.gpus_per_node=2", "deepspeed=zero3"], 12, 12),
    # bf16 ZeRO-2 on one GPU keeps stage 2: 2 + 12.
    ([*GPU, "plan.gpus_per_node=1", "deepspeed=zero2"], 14, 14),
    # 4 nodes: rank 0's node writes the whole bf16 weights and its quarter of the 12 B; the others a quarter.
    ([*GPU, "plan.nodes=4", "plan.gpus_per_node=8", "deepspeed=zero2"], 14, 2 + 12 / 4),
    ([*GPU, "plan.nodes=4", "plan.gpus_per_node=8", "deepspeed=zero3"], 12, 12 / 4),
    ([*GPU, "plan.nodes=4", "plan.gpus_per_node=8", "deepspeed=zero3_offload"], 12, 12 / 4),
])
def test_checkpoint_bytes_per_parameter(overrides, total, busiest):
    _, arch, s = setup_for(overrides)
    terms, node = plan.checkpoint_files(arch, s)
    assert sum(b for _, b in terms) == pytest.approx(total * arch.params, rel=1e-12)
    assert node == pytest.approx(busiest * arch.params, rel=1e-12)


def test_save_time_and_signal_lead_by_hand():
    """Qwen2.5-72B on 4 nodes x 8 GPUs, ZeRO-3, its defaults (global batch 64, 512 tokens, gradient
    checkpointing): 12 B x 72,706,203,648 = 872.47 GB, 218.12 GB per node, at 2 GB/s per node 109.06 s.
    Step: 8 x 72,706,203,648 x (64 x 2 x 512) tokens / 32 GPUs / 150e12 FLOP/s = 7.94 s.
    Lead: ceil(7.94 + 109.06 + 60) = 178 s. A measured step of 30 s instead: ceil(30 + 109.06 + 60) = 200.
    At 1 node: all 872.47 GB on one node at 2 GB/s, 436.24 s, and the step 4x longer, 31.77 s: lead
    ceil(31.77 + 436.24 + 60) = 529 s."""
    base = ["model=qwen2.5-72b", "plan.gpus_per_node=8", "plan.checkpoint_write_gbps=2"]
    cfg, arch, s = setup_for([*base, "plan.nodes=4"])
    sv = plan.checkpoint_save(arch, s, cfg.plan)
    assert sv.total / 1e9 == pytest.approx(872.474, abs=1e-3)
    assert sv.busiest_node_bytes / 1e9 == pytest.approx(218.119, abs=1e-3)
    assert sv.save_seconds == pytest.approx(109.059, abs=1e-3)
    assert sv.step_estimated and sv.step_seconds == pytest.approx(7.941, abs=1e-3)
    assert sv.lead_seconds == 178
    cfg, arch, s = setup_for([*base, "plan.nodes=4", "plan.step_seconds=30"])
    sv = plan.checkpoint_save(arch, s, cfg.plan)
    assert not sv.step_estimated and sv.lead_seconds == 200
    cfg, arch, s = setup_for([*base, "plan.nodes=1"])
    sv = plan.checkpoint_save(arch, s, cfg.plan)
    assert sv.save_seconds == pytest.approx(436.237, abs=1e-3) and sv.step_seconds == pytest.approx(31.766, abs=1e-3)
    assert sv.lead_seconds == 529


def test_cli_prints_the_checkpoint_and_the_lead_the_slurm_script_reads():
    args = ["model=qwen2.5-72b", "plan.nodes=4", "plan.checkpoint_write_gbps=2"]
    out = run_stage("dpo_dist.plan", args, timeout=120).stdout
    assert "checkpoint (ZeRO-3), all ranks" in out and "872.47" in out
    assert "-> 178 s" in out and "sbatch --signal=B:USR1@178" in out
    assert run_stage("dpo_dist.plan", [*args, "plan.lead_only=true"], timeout=120).stdout == "178\n"
    with pytest.raises(ConfigError, match=r"^plan\.checkpoint_write_gbps: must be > 0"):
        compose(["plan.checkpoint_write_gbps=0"])
    # What slurm/pipeline.sbatch shows when the planner cannot give a lead: one line, no traceback.
    proc = subprocess.run([sys.executable, "-m", "dpo_dist.plan", "model.num_layers=0", "plan.lead_only=true"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr.splitlines() == ["dpo_dist.plan: error: model.num_layers: the planner needs it (from the model's "
                                        "config.json); conf/model/smollm2-135m.yaml does not set it"]


def test_cpu_plan_for_a_model_not_on_this_machine_is_one_line_naming_model_path(tmp_path):
    """plan.device=cpu measures a fresh rank's baseline, the model's tokenizer included, in a probe
    process. A model that is not here failed it with a CalledProcessError traceback around the
    probe's script (found planning the Qwen2.5-0.5B shape); now the probe's own error, one line."""
    missing = tmp_path / "no-such-model"
    proc = subprocess.run([sys.executable, "-m", "dpo_dist.plan", f"model.path={missing}", "plan.device=cpu"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stdout) == (2, ""), proc.stderr[-2000:]
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("dpo_dist.plan: error: plan.device=cpu measures"), lines
    assert f"model.path='{missing}'" in lines[0] or f"model.path={missing}" in lines[0], lines[0]


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("deepspeed,world,stage", [("zero2", 1, 0), ("zero2", 2, 2), ("zero3", 2, 3)])
def test_checkpoint_size_is_what_deepspeed_writes(tmp_path, deepspeed, world, stage):
    """One step of the Qwen-shaped test model (39.3M parameters, fp32 on the CPU; the planner counts
    Qwen's parameters exactly), its checkpoint kept: the files DeepSpeed wrote for that step add up to
    checkpoint_files' total within 1% (pickle headers, scheduler and client state; the terms differ by
    12% or more), and at stage 2 rank 0's weights file is 4P and each rank's optimizer file 12P/N."""
    pairs = write_identity_pairs(tmp_path / "pairs.jsonl")
    run_dir = tmp_path / "run"
    run_stage("dpo_dist.train", [f"run_dir={run_dir}", "model=qwen-test", f"data.pairs={pairs}", f"deepspeed={deepspeed}",
                                 "train.global_batch_size=2", "train.micro_batch_size=1", "train.max_steps=1",
                                 "train.keep_checkpoints_after_export=true", "data.max_length=96", "data.max_prompt_length=64",
                                 "wandb.mode=disabled"],
              nproc=world, timeout=900)
    [tag] = run_dir.rglob("step-0000001")
    files = {p.name: p.stat().st_size for p in tag.iterdir()}
    cfg, arch, s = setup_for(["model=qwen-test", f"deepspeed={deepspeed}", "plan.device=cpu", f"plan.gpus_per_node={world}"])
    assert s.stage == stage
    terms, busiest = plan.checkpoint_files(arch, s)
    planned = sum(b for _, b in terms)
    assert sum(files.values()) == pytest.approx(planned, rel=1e-2), (files, terms)
    assert busiest == planned  # one node writes it all
    if stage == 2:
        P = arch.params
        assert files["mp_rank_00_model_states.pt"] == pytest.approx(4 * P, rel=1e-2)
        for rank in range(world):
            assert files[f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"] == pytest.approx(12 * P / world, rel=1e-2)


def _window(a, max_live=1e9):
    """Prefetched elements beyond the module in use: up to max_live, the rest of a smaller model."""
    return min(max_live, a.params - a.largest_module_params)


@pytest.mark.parametrize("overrides,expected", [
    # ZeRO-2 gathers nothing.
    (["model=qwen2.5-0.5b", "deepspeed=zero2", "plan.gpus_per_node=8"], lambda a: 0),
    # A model under stage3_max_live_parameters is prefetched whole (less the module in use), bf16.
    (["model=qwen2.5-0.5b", "deepspeed=zero3", "plan.gpus_per_node=8"], lambda a: 2 * (a.params - a.largest_module_params)),
    # 7B and 72B: max_live (1e9) elements beyond the largest module, which the live count passes
    # max_live by when it is fetched onto a full window (the untied lm_head, the embedding in the
    # backward).
    (["model=qwen2.5-7b", "deepspeed=zero3", "plan.gpus_per_node=8"], lambda a: 2 * 1e9),
    (["model=qwen2.5-72b", "deepspeed=zero3", "plan.gpus_per_node=8"], lambda a: 2 * 1e9),
    # Prefetching off: 7B keeps only what DeepSpeed's reuse distance (1e9) holds from forward to
    # backward, under its embedding; 0.5B is kept whole that way too (measured, docs/benchmark.md).
    (["model=qwen2.5-7b", "deepspeed=zero3", "deepspeed.stage3_prefetch_bucket_size=0"], lambda a: 0),
    (["model=qwen2.5-0.5b", "deepspeed=zero3", "deepspeed.stage3_prefetch_bucket_size=0"],
     lambda a: 2 * (a.params - a.largest_module_params)),
    # Prefetching capped lower.
    (["model=qwen2.5-7b", "deepspeed=zero3", "deepspeed.stage3_max_live_parameters=600000000"],
     lambda a: 2 * 6e8),
    # fp32 on the CPU: 4 bytes per element.
    (["model=qwen2.5-0.5b", "deepspeed=zero3", "plan.device=cpu", "plan.gpus_per_node=2"],
     lambda a: 4 * (a.params - a.largest_module_params)),
])
def test_zero3_prefetch_is_counted_up_to_max_live(overrides, expected):
    """ZeRO-3 prefetches parameters ahead of use from the second forward, up to
    stage3_max_live_parameters in all (measured: the whole 0.5B shape, docs/benchmark.md); the
    training phase counts it with the run's settings, the reference pass with DeepSpeed's defaults
    (its forward-only engine sets none)."""
    _, arch, s = setup_for(overrides)
    key = "parameters prefetched ahead (ZeRO-3, to max_live)"
    assert dict(plan.training(arch, s).terms).get(key, 0) == pytest.approx(expected(arch))
    ref = dict(plan.reference(arch, s).terms).get("parameters prefetched ahead (DeepSpeed's defaults)", 0)
    assert ref == pytest.approx(s.weight_bytes * _window(arch) if s.stage == 3 else 0)


@pytest.mark.parametrize("overrides,reduce_buckets,prefetch_buckets", [
    # Stage 2: one reduce bucket, two with overlap_comm (stage_1_and_2 swaps between them).
    (["model=qwen2.5-0.5b", "deepspeed=zero2", "plan.gpus_per_node=8"], 1, 0),
    (["model=qwen2.5-0.5b", "deepspeed=zero2", "deepspeed.overlap_comm=true", "plan.gpus_per_node=8"], 2, 0),
    # Stage 3: the IPG buffer and reduce_scatter_coalesced's flattened copy whatever overlap_comm
    # says, and the flat buffer a prefetch of several parameters is all-gathered into.
    (["model=qwen2.5-7b", "deepspeed=zero3", "plan.gpus_per_node=8"], 2, 1),
    (["model=qwen2.5-7b", "deepspeed=zero3", "deepspeed.overlap_comm=true", "plan.gpus_per_node=8"], 2, 1),
    (["model=qwen2.5-7b", "deepspeed=zero3", "deepspeed.stage3_prefetch_bucket_size=0"], 2, 0),
])
def test_communication_buckets_per_zero_stage(overrides, reduce_buckets, prefetch_buckets):
    _, arch, s = setup_for(overrides)
    buckets = dict(plan.training(arch, s).terms)["communication buckets"]
    assert buckets == s.weight_bytes * (reduce_buckets * s.reduce_bucket_size + prefetch_buckets * s.prefetch_bucket_size)
    ref = dict(plan.reference(arch, s).terms).get("prefetch all-gather buffer", 0)
    assert ref == (s.weight_bytes * 5e7 if s.stage == 3 else 0)


def test_shipped_table_tells_invalid_settings_from_out_of_memory():
    """`plan.all=true`: a config whose batch does not split over the ranks fits in memory, so its GiB
    get no ✗ and its verdict says the settings are invalid, with the micro-batch that keeps the
    recipe's global batch; one over the budget gets the ✗."""
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): [c.strip() for c in line.split("|")[1:-1]]
            for line in plan.all_shipped_table().splitlines()[2:]}
    small = rows[("qwen2.5-0.5b", "4x8x80GB")]
    assert not small[3].endswith("✗") and small[7] == "no: training (invalid settings)" and small[8] == "train.micro_batch_size=2"
    big = rows[("qwen2.5-7b", "1x1x80GB")]
    assert big[3].endswith(" ✗") and big[7] == "no: training"
