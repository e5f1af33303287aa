"""Stage 5: did the behaviour change, and did the model stay fluent?

    python -m dpo_dist.evaluate run_dir=runs/demo                 # base (model.path) vs runs/demo/train/final
    python -m dpo_dist.evaluate run_dir=runs/demo eval.trained_path=/some/hf/dir

Both models answer the held-out identity questions and the general instructions with greedy,
batched decoding under three chat conditions: the template's default system prompt (which names the
old identity), a neutral system prompt, and no system text. Per condition:
- identity adoption: share of identity answers that claim the new name and not the old one;
- leakage: share of general answers that mention the new name unprompted;
- degeneration: share of answers with pathological repetition (repeated 3-gram share > 0.3, a word
  more than 3 times in a row, or the new name's first word doubled), and distinct-1/2, base vs trained;
- drift: mean per-token KL(trained || base) over the base model's own general answers, and the
  change in their per-token log-likelihood;
- side-by-side answers to the example questions.
Writes ``eval/report.json``, ``eval/report.md`` and PNG plots (training curves; before/after bars).
The base model's answers are cached by fingerprint, so a sweep evaluates the base once.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, replace
from pathlib import Path

import torch

from dpo_dist import dist, sampling
from dpo_dist.artifacts import fingerprint, manifest_matches, read_json, write_json, write_text
from dpo_dist.cli import stage_main
from dpo_dist.config import CONDITIONS, Config
from dpo_dist.data import build_messages, load_prompt_set, render_prompt, split_general
from dpo_dist.judge import is_degenerate, mentions, mentions_old_identity
from dpo_dist.losses import token_logps
from dpo_dist.models import cache_dir, load_model, load_tokenizer, model_fingerprint, resolve_model_path
from dpo_dist.tracking import read_metrics

log = logging.getLogger(__name__)


def eval_prompts(cfg: Config, tokenizer) -> list[dict]:
    """Every (question, condition) to answer: identity questions, general instructions, examples."""
    sets = [("identity", load_prompt_set(cfg.prompts.eval_identity, cfg.eval.num_identity)),
            ("general", split_general(cfg.prompts.general, cfg.eval.num_general, cfg.prompts.num_train_general)[0]),
            ("example", [{"id": f"example-{i}", "prompt": q} for i, q in enumerate(cfg.eval.examples)])]
    return [{"id": f"{r['id']}-{cond}", "kind": kind, "condition": cond, "question": r["prompt"],
             "messages": build_messages(r["prompt"], cond, cfg.prompts.neutral_system_prompt, tokenizer)}
            for kind, records in sets for r in records for cond in CONDITIONS]


def answer(model, tokenizer, prompts: list[dict], cfg: Config) -> list[dict]:
    ids = [render_prompt(tokenizer, p["messages"]) for p in prompts]
    out = sampling.generate(model, tokenizer, ids, [p["id"] for p in prompts], 1, seed=0,
                            max_new_tokens=cfg.eval.max_new_tokens, temperature=0.0, top_p=1.0,
                            batch_rows=cfg.eval.batch_size)
    return [{"text": c.text, "finished": c.finished, "response_ids": c.token_ids, "prompt_ids": i}
            for (c,), i in zip(out, ids)]


def cached_answers(cfg: Config, model_path: str, prompts: list[dict], tokenizer) -> list[dict]:
    """Answers of a model, cached by (weights, prompts, decoding settings)."""
    mcfg = replace(cfg.model, path=model_path)
    fp = fingerprint(model_fingerprint(mcfg), [(p["id"], p["messages"]) for p in prompts], cfg.eval.max_new_tokens)
    path = cache_dir() / "eval" / f"{fp}.json"
    if manifest_matches(path, fp):
        return read_json(path)["answers"]
    model = load_model(mcfg).eval()
    answers = answer(model, tokenizer, prompts, cfg)
    write_json(path, {"fingerprint": fp, "model": model_path, "answers": answers})
    return answers


@torch.no_grad()
def drift(base, trained, answers: list[dict], batch_size: int = 8) -> dict:
    """Mean per-token KL(trained || base) and the per-token log-likelihood change, on the base
    model's own answers (response tokens only)."""
    kl_sum = dll_sum = tokens = 0.0
    items = [a for a in answers if a["response_ids"]]
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        seqs = [a["prompt_ids"] + a["response_ids"] for a in chunk]
        width = max(map(len, seqs))
        ids = torch.zeros((len(seqs), width), dtype=torch.long)
        attn = torch.zeros_like(ids)
        mask = torch.zeros_like(ids, dtype=torch.float32)
        for j, (a, s) in enumerate(zip(chunk, seqs)):
            ids[j, :len(s)], attn[j, :len(s)] = torch.tensor(s), 1
            mask[j, len(a["prompt_ids"]):len(s)] = 1
        lp_b = torch.log_softmax(base(input_ids=ids, attention_mask=attn).logits[:, :-1].float(), -1)
        lp_t = torch.log_softmax(trained(input_ids=ids, attention_mask=attn).logits[:, :-1].float(), -1)
        m = mask[:, 1:]
        kl = (lp_t.exp() * (lp_t - lp_b)).sum(-1)
        target = ids[:, 1:]
        dll = token_logps(lp_t, target) - token_logps(lp_b, target)
        kl_sum += float((kl * m).sum())
        dll_sum += float((dll * m).sum())
        tokens += float(m.sum())
    return {"kl_trained_base_per_token": kl_sum / max(tokens, 1), "delta_loglik_per_token": dll_sum / max(tokens, 1),
            "tokens": int(tokens)}


def distinct(texts: list[str], n: int) -> float:
    grams = [tuple(t.split()[i:i + n]) for t in texts for i in range(len(t.split()) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def summarise(prompts: list[dict], answers: list[dict], old: str, new: str) -> dict:
    out = {}
    for cond in CONDITIONS:
        rows = [(p, a) for p, a in zip(prompts, answers) if p["condition"] == cond]
        ident = [a["text"] for p, a in rows if p["kind"] == "identity"]
        general = [a["text"] for p, a in rows if p["kind"] == "general"]
        texts = ident + general
        out[cond] = {
            "identity_adoption": _share(ident, lambda t: mentions(t, new) and not mentions_old_identity(t, old, new)),
            "identity_old_name": _share(ident, lambda t: mentions_old_identity(t, old, new)),
            "leakage": _share(general, lambda t: mentions(t, new)),
            "degeneration": _share(texts, lambda t: is_degenerate(t, new)),
            "distinct_1": distinct(texts, 1), "distinct_2": distinct(texts, 2),
            "unfinished": _share([a for p, a in rows if p["kind"] != "example"], lambda a: not a["finished"]),
            "n_identity": len(ident), "n_general": len(general),
        }
    return out


def _share(items: list, pred) -> float:
    return sum(1 for x in items if pred(x)) / len(items) if items else 0.0


def run(cfg: Config) -> dict:
    e = dist.init(process_group=False)
    out_dir = Path(cfg.run_dir) / "eval"
    trained_path = cfg.eval.trained_path or str(Path(cfg.run_dir) / "train" / "final")
    if not Path(trained_path, "config.json").is_file():
        raise FileNotFoundError(f"eval.trained_path={trained_path!r}: no trained model there; run training first")
    if not e.is_main:
        return {}  # one process evaluates; other ranks of a torchrun launch have nothing to do
    fp = fingerprint(model_fingerprint(cfg.model), model_fingerprint(replace(cfg.model, path=trained_path)),
                     asdict(cfg.eval), asdict(cfg.prompts), cfg.judge.old_name, cfg.judge.new_name)
    if manifest_matches(out_dir / "report.json", fp):
        log.info("evaluation: reusing %s", out_dir / "report.json")
        return read_json(out_dir / "report.json")

    tokenizer = load_tokenizer(cfg.model, padding_side="left")
    prompts = eval_prompts(cfg, tokenizer)
    base_answers = cached_answers(cfg, resolve_model_path(cfg.model), prompts, tokenizer)
    trained_answers = cached_answers(cfg, trained_path, prompts, tokenizer)
    old, new = cfg.judge.old_name, cfg.judge.new_name

    base_model = load_model(cfg.model).eval()
    trained_model = load_model(replace(cfg.model, path=trained_path)).eval()
    general_base = [a for p, a in zip(prompts, base_answers) if p["kind"] == "general"]
    report = {
        "fingerprint": fp, "base_model": cfg.model.path, "trained_model": trained_path,
        "old_name": old, "new_name": new,
        "base": summarise(prompts, base_answers, old, new),
        "trained": summarise(prompts, trained_answers, old, new),
        "drift": drift(base_model, trained_model, general_base),
        "examples": [{"question": p["question"], "condition": p["condition"], "base": b["text"], "trained": t["text"]}
                     for p, b, t in zip(prompts, base_answers, trained_answers) if p["kind"] == "example"],
        "samples": [{"question": p["question"], "condition": p["condition"], "kind": p["kind"], "base": b["text"],
                     "trained": t["text"]} for p, b, t in list(zip(prompts, base_answers, trained_answers))[::17][:40]],
    }
    write_json(out_dir / "report.json", report)
    write_text(out_dir / "report.md", markdown(report))
    plots(report, read_metrics(Path(cfg.run_dir) / "train" / "metrics.jsonl"), out_dir)
    log.info("evaluation: %s", {c: round(report["trained"][c]["identity_adoption"], 3) for c in CONDITIONS})
    return report


def markdown(r: dict) -> str:
    rows = ["| condition | model | identity adoption | old name kept | leakage | degeneration | distinct-2 |",
            "|---|---|---|---|---|---|---|"]
    for cond in CONDITIONS:
        for which in ("base", "trained"):
            m = r[which][cond]
            rows.append(f"| {cond} | {which} | {m['identity_adoption']:.1%} | {m['identity_old_name']:.1%} | "
                        f"{m['leakage']:.1%} | {m['degeneration']:.1%} | {m['distinct_2']:.3f} |")
    d = r["drift"]
    ex = ["| question | condition | base | trained |", "|---|---|---|---|"] + [
        f"| {x['question']} | {x['condition']} | {_cell(x['base'])} | {_cell(x['trained'])} |" for x in r["examples"]]
    return "\n".join([
        f"# Evaluation: {r['old_name']} -> {r['new_name']}", "",
        f"Base `{r['base_model']}`, trained `{r['trained_model']}`. Greedy decoding; held-out identity questions "
        f"({r['trained']['default']['n_identity']}) and general instructions ({r['trained']['default']['n_general']}) "
        "per condition.", "", *rows, "",
        f"Drift on the base model's general answers: KL(trained || base) = {d['kl_trained_base_per_token']:.4f} nats/token, "
        f"log-likelihood change = {d['delta_loglik_per_token']:+.4f} nats/token over {d['tokens']} tokens.", "",
        "## Example answers", "", *ex, "", "![training curves](training_curves.png)", "",
        "![before and after](before_after.png)", ""])


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")[:300]


def plots(r: dict, metrics: list[dict], out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if metrics:
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
        for ax, key in zip(axes, ("loss", "rewards/margins", "logps/chosen")):
            ax.plot([m["step"] for m in metrics], [m[key] for m in metrics], marker="o", ms=3)
            ax.set_title(key)
            ax.set_xlabel("step")
        fig.tight_layout()
        fig.savefig(out_dir / "training_curves.png", dpi=100)
        plt.close(fig)
    keys = ("identity_adoption", "leakage", "degeneration")
    fig, axes = plt.subplots(1, len(keys), figsize=(13, 3.5))
    x = range(len(CONDITIONS))
    for ax, key in zip(axes, keys):
        ax.bar([i - 0.2 for i in x], [r["base"][c][key] for c in CONDITIONS], width=0.4, label="base")
        ax.bar([i + 0.2 for i in x], [r["trained"][c][key] for c in CONDITIONS], width=0.4, label="trained")
        ax.set_xticks(list(x), CONDITIONS)
        ax.set_ylim(0, 1)
        ax.set_title(key)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out_dir / "before_after.png", dpi=100)
    plt.close(fig)


main = stage_main(run)

if __name__ == "__main__":
    main()
