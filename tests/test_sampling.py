"""Batched, per-prompt reproducible decoding against transformers' own generate."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dpo_dist import sampling
from dpo_dist.data import render_prompt


def _setup(tiny_llama):
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    qs = ["Hi", "What is the capital of France, please tell me?", "Who are you?", "2+2"]
    return tok, model, [render_prompt(tok, [{"role": "user", "content": q}]) for q in qs]


def test_greedy_matches_transformers_generate():
    """The bundled model, whose greedy answers depend on the prompt (a random tiny model answers every
    prompt with one repeated token, which any decoder matches): four prompts of different lengths
    in one left-padded batch, two answers ending with EOS while the others go on, each equal to
    transformers' generate on that prompt alone, token for token."""
    from dpo_dist.config import compose
    from dpo_dist.models import load_model, load_tokenizer

    cfg = compose().model
    tok, model = load_tokenizer(cfg), load_model(cfg).eval()
    qs = ["Hi", "What is the capital of France, please tell me?", "Who are you?",
          "What is 2+2? Answer with the number only."]
    prompts = [render_prompt(tok, [{"role": "user", "content": q}]) for q in qs]
    ours = sampling.generate(model, tok, prompts, ["a", "b", "c", "d"], 1, seed=0, max_new_tokens=16,
                             temperature=0, top_p=1, batch_rows=4)
    answers = [c for (c,) in ours]
    assert len({tuple(c.token_ids) for c in answers}) == 4 and [c.finished for c in answers] == [True, False, False, True]
    for p, c in zip(prompts, answers):
        ref = model.generate(torch.tensor([p]), max_new_tokens=16, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)[0, len(p):].tolist()
        assert c.token_ids == ref  # up to and with EOS, or all 16 tokens
        assert c.finished == (c.token_ids[-1] == tok.eos_token_id)


def test_samples_are_reproducible_per_prompt_whatever_the_batch(tiny_llama):
    tok, model, prompts = _setup(tiny_llama)
    kw = dict(seed=7, max_new_tokens=10, temperature=1.0, top_p=0.9)
    together = sampling.generate(model, tok, prompts, ["a", "b", "c", "d"], 3, batch_rows=12, **kw)
    alone = sampling.generate(model, tok, prompts[2:3], ["c"], 3, batch_rows=3, **kw)
    assert [c.token_ids for c in together[2]] == [c.token_ids for c in alone[0]]
    # Different candidates of one prompt differ (own seeds), and another seed changes them.
    assert len({tuple(c.token_ids) for c in together[1]}) > 1
    other = sampling.generate(model, tok, prompts[2:3], ["c"], 3, batch_rows=3, **{**kw, "seed": 8})
    assert [c.token_ids for c in other[0]] != [c.token_ids for c in alone[0]]


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    seen = {int(sampling._sample(logits, 1.0, 0.7, [torch.Generator().manual_seed(s)])) for s in range(200)}
    assert seen == {0, 1}


def test_flat_distributions_fall_back_to_the_full_nucleus():
    """A row whose top candidates do not reach top_p is sampled from the whole sorted vocabulary."""
    vocab = 5000
    # Nearly uniform and decreasing, so probability order is id order: the top 1,024 hold ~20% of
    # the mass, and any id >= 1024 can only come from the full-vocabulary fallback.
    flat = -1e-4 * torch.arange(vocab, dtype=torch.float32).unsqueeze(0)
    peaked = torch.full((1, vocab), -30.0)
    peaked[0, 7] = 0.0
    logits = torch.cat([flat, peaked])
    seen_flat = set()
    for s in range(60):
        g = [torch.Generator().manual_seed(s), torch.Generator().manual_seed(1000 + s)]
        pick = sampling._sample(logits, 1.0, 0.9, g)
        assert int(pick[1]) == 7
        seen_flat.add(int(pick[0]))
    assert max(seen_flat) >= 1024


def test_nucleus_threshold_keeps_the_set_sample_draws_from():
    """The threshold form (used inside vLLM) keeps exactly the tokens _nucleus keeps, for rows whose
    nucleus lies inside the candidates and rows that need the full sort."""
    torch.manual_seed(0)
    vocab = 3000
    logits = torch.cat([torch.randn(5, vocab) * 4, torch.randn(3, vocab) * 0.05])
    top_p = torch.tensor([0.95, 0.5, 0.9, 0.01, 0.999, 0.95, 0.5, 0.8])
    kept = logits >= sampling.nucleus_threshold(logits, top_p, candidates=64).unsqueeze(1)
    for row in range(len(top_p)):
        probs, order = torch.softmax(logits[row], -1).sort(descending=True)
        inside = (probs.cumsum(-1) - probs) < top_p[row]  # _nucleus's rule, on the full sort
        assert set(order[inside].tolist()) == set(kept[row].nonzero().flatten().tolist()), row
    assert kept[3].sum() == 1 and kept[4].sum() > kept[0].sum() and (kept[5:].sum(1) > 64).all()


def _row_generators(seeds):
    return [torch.Generator(device="cpu").manual_seed(s) for s in seeds]


def test_the_draw_meets_the_probabilities_on_their_device():
    """Each row's uniform comes from its CPU generator and must move to the probabilities' device: a
    (rows,) CPU tensor meeting a CUDA one fails at the first sampled token. The meta device stands in
    for CUDA here (CPU x meta raises the same device mismatch)."""
    sorted_probs, sorted_idx = torch.softmax(torch.randn(3, 50), -1).sort(dim=-1, descending=True)
    pick = sampling._nucleus(sorted_probs.to("meta"), sorted_idx.to("meta"), 0.9, _row_generators(range(3)))
    assert pick.device.type == "meta" and pick.shape == (3,)


@pytest.mark.gpu
def test_cuda_samples_what_the_cpu_samples():
    """The same logits and row seeds give the same tokens on a GPU as on the CPU (host draws), for
    rows inside the top candidates and rows that need the full-vocabulary fallback."""
    vocab = 5000
    peaked = torch.log(torch.tensor([0.4, 0.3, 0.2, 0.1] + [1e-9] * (vocab - 4))).unsqueeze(0)
    flat = -1e-4 * torch.arange(vocab, dtype=torch.float32).unsqueeze(0)
    logits = torch.cat([peaked, flat, peaked, flat])
    for s in range(20):
        seeds = [4 * s + i for i in range(4)]
        on_cpu = sampling._sample(logits, 1.0, 0.9, _row_generators(seeds))
        on_gpu = sampling._sample(logits.cuda(), 1.0, 0.9, _row_generators(seeds))
        assert on_gpu.device.type == "cuda" and on_gpu.cpu().tolist() == on_cpu.tolist()
