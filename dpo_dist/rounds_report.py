"""The rounds of an iterative run side by side: did each round adopt more, leak less, stay fluent?

    from dpo_dist import rounds_report
    rounds_report.write(Path("runs/demo"), num_rounds=3)   # after any round; the pipeline calls it

Reads each round's records (``round-<k>/eval/report.json``, ``judge/summary.json``,
``train/summary.json``; rounds not evaluated yet are left out) and writes ``<run_dir>/rounds.json``
(one row per round), ``rounds.md`` (the last round's verdict, then a table with a column per round)
and ``rounds.png`` (adoption, leakage, degeneration per condition and KL against the round).

The judge's ``chosen_from`` and ``mistakes`` are read with defaults: runs judged before they existed
(and offline pairs, which have no judge summary) show them as n/a.
"""

from __future__ import annotations

from pathlib import Path

from dpo_dist.artifacts import DataError, atomic_path, read_json, write_json, write_text
from dpo_dist.config import CONDITIONS
from dpo_dist.evaluate import by_condition, percent, verdict
from dpo_dist.rounds import round_dir

SHARES = ("identity_adoption", "leakage", "degeneration")
# judge.mistakes' kinds, each a share of the own answers to its kind of prompt (identity or general).
MISTAKES = {"identity_no_name": "identity answers without the new name",
            "identity_old_name": "identity answers with the old name",
            "identity_degenerate": "identity answers degenerate",
            "identity_unfinished": "identity answers unfinished",
            "general_leak": "general answers naming the new identity",
            "general_degenerate": "general answers degenerate"}


def collect(run_dir: Path, num_rounds: int) -> list[dict]:
    """One row per round 1..num_rounds that has an evaluation report, in round order."""
    rows = []
    for k in range(1, num_rounds + 1):
        here = round_dir(run_dir, k)
        if (here / "eval" / "report.json").is_file():
            rows.append({"round": k, "later": _optional(here / "round.json").get("later") or {},
                         **_evaluation(here / "eval" / "report.json"),
                         **_judged(_optional(here / "judge" / "summary.json")),
                         **_trained(_optional(here / "train" / "summary.json"))})
    return rows


def _optional(path: Path) -> dict:
    return read_json(path) if path.is_file() else {}


def _evaluation(path: Path) -> dict:
    report = read_json(path)
    try:
        drift = report.get("drift")
        return {"trained": {c: {k: report["trained"][c][k] for k in SHARES} for c in CONDITIONS},
                # The base model the verdict measured this round against (the pipeline's is model.path).
                "base": {c: {k: report["base"][c][k] for k in SHARES} for c in CONDITIONS},
                "kl_per_token": drift["kl_trained_base_per_token"] if drift else None,
                "verdict": (report.get("verdict") or verdict(report))["text"]}
    except (KeyError, TypeError) as e:
        raise DataError(f"{path}: not an evaluation report (no {e} in it)") from None


def _judged(summary: dict) -> dict:
    pairs, chosen, found = summary.get("pairs"), summary.get("chosen_from"), summary.get("mistakes")
    row = {"pairs": pairs, "anchors": summary.get("anchors"),
           "chosen_own": chosen.get("own") if chosen else None,
           "chosen_opener": chosen.get("opener") if chosen else None,
           "chosen_sign_off": chosen.get("sign_off") if chosen else None,
           "identity_pairs": sum(chosen.values()) if chosen else None,
           # Of the identity pairs, which judge.run counts in chosen_from (correction's rewrites are neither).
           "own_share": chosen.get("own", 0) / sum(chosen.values()) if chosen and any(chosen.values()) else None,
           "own_answers": {}, "mistakes": {}, "mistake_shares": {},
           # generation.leak_search_candidates: answers searched, leaks among them, pairs they gave.
           "leak_search": None}
    if found and found.get("search_answers_general"):
        row["leak_search"] = {"answers": found["search_answers_general"], "leaks": found.get("search_general_leak", 0),
                              "pairs": summary.get("leak_search_pairs", 0)}
    if found:  # the identity judge's, from issue 23 on
        own = {kind: found.get(f"own_answers_{kind}", 0) for kind in ("identity", "general")}
        row.update(own_answers=own, mistakes={k: found.get(k, 0) for k in MISTAKES},
                   mistake_shares={k: found.get(k, 0) / max(own[k.split("_")[0]], 1) for k in MISTAKES})
    return row


def _trained(summary: dict) -> dict:
    return {"train_steps": summary.get("steps"), "final_loss": (summary.get("metrics") or {}).get("loss")}


def write(run_dir: Path, num_rounds: int) -> dict | None:
    """``rounds.json``, ``rounds.md`` and ``rounds.png`` in ``run_dir``; ``{"rounds": rows}``, or None
    (and nothing written) when no round is evaluated yet."""
    run_dir = Path(run_dir)
    rows = collect(run_dir, num_rounds)
    if not rows:
        return None
    summary = {"rounds": rows}
    write_json(run_dir / "rounds.json", summary)
    write_text(run_dir / "rounds.md", markdown(rows, num_rounds))
    _save_png(figure(rows), run_dir / "rounds.png")
    return summary


def markdown(rows: list[dict], num_rounds: int) -> str:
    conds = "/".join(CONDITIONS)

    def line(label: str, cell) -> str:
        return f"| {label} | " + " | ".join(cell(r) for r in rows) + " |"

    def mistake(key: str):
        return lambda r: f"{r['mistakes'][key]} ({percent(r['mistake_shares'][key])}%)" if r["mistakes"] else "n/a"

    last = rows[-1]
    missing = [k for k in range(1, num_rounds + 1) if k not in {r["round"] for r in rows}]
    table = [
        "| | " + " | ".join(f"[round {r['round']}](round-{r['round']}/eval/report.md)" for r in rows) + " |",
        "|---|" + "---|" * len(rows),
        *(line(f"{label} ({conds})", lambda r, w=which, k=key: by_condition(r[w], k, CONDITIONS))
          for label, which, key in (("identity adoption", "trained", "identity_adoption"),
                                    ("base identity adoption", "base", "identity_adoption"),
                                    ("leakage", "trained", "leakage"), ("base leakage", "base", "leakage"),
                                    ("degeneration", "trained", "degeneration"),
                                    ("base degeneration", "base", "degeneration"))),
        line("KL to base, nats/token",
             lambda r: "not measured" if r["kl_per_token"] is None else f"{r['kl_per_token']:.3f}"),
        line("pairs (anchors)", lambda r: "n/a" if r["pairs"] is None else f"{r['pairs']} ({r['anchors']})"),
        line("identity pairs chosen from the policy's own answers", lambda r: "n/a" if r["own_share"] is None else
             f"{percent(r['own_share'])}% ({r['chosen_own']} of {r['identity_pairs']})"),
        line("own answers judged (identity, general)",
             lambda r: f"{r['own_answers']['identity']}, {r['own_answers']['general']}" if r["own_answers"] else "n/a"),
        *(line(f"mistakes: {label}", mistake(key)) for key, label in MISTAKES.items()),
        *([line("leak search: leaking answers of those searched, pairs made",
                lambda r: "none" if not r["leak_search"] else
                f"{r['leak_search']['leaks']} of {r['leak_search']['answers']}, {r['leak_search']['pairs']} pairs")]
          if any(r["leak_search"] for r in rows) else []),
        *([line("settings of this round (rounds.later)", lambda r: ", ".join(
            f"{k}={v}" for k, v in sorted(r["later"].items())) or "the run's")]
          if any(r["later"] for r in rows) else []),
        line("train steps, final loss", lambda r: "n/a" if r["train_steps"] is None else
             f"{r['train_steps']}, {r['final_loss']:.4g}"),
    ]
    return "\n".join([
        f"# Rounds: {len(rows)} of {num_rounds} evaluated", "",
        f"**Round {last['round']} verdict:** {last['verdict'].removeprefix('Verdict: ')}", "",
        *([f"Not evaluated yet: round {', '.join(map(str, missing))}.", ""] if missing else []),
        "Shares of held-out answers per system-prompt condition; base is the model before any round. "
        "Mistakes are counted in the answers the policy sampled for that round's pairs (round 1: the "
        "base model's), as a share of its answers to that kind of prompt.", "",
        *table, "", "![rounds](rounds.png)", ""])


def figure(rows: list[dict]):
    """One figure: adoption, leakage and degeneration per condition (base dotted), in percent of
    answers, and KL, by round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["round"] for r in rows]
    fig, axes = plt.subplots(1, len(SHARES) + 1, figsize=(16, 3.5))
    for ax, key in zip(axes, SHARES):
        for i, c in enumerate(CONDITIONS):
            ax.plot(x, [100 * r["trained"][c][key] for r in rows], marker="o", color=f"C{i}", label=c, clip_on=False)
            ax.plot(x, [100 * r["base"][c][key] for r in rows], ls=":", color=f"C{i}", label=f"{c} (base)")
        ax.set_title(f"{key}, %")
        # Leakage and degeneration live in the first few percent: on a 0-100 axis 2% -> 1% is flat.
        ax.set_ylim(0, 100 if key == "identity_adoption" else max(5, ax.get_ylim()[1]))
    axes[0].legend(fontsize=7)
    kl = [r["kl_per_token"] for r in rows]
    axes[-1].plot(x, [float("nan") if v is None else v for v in kl], marker="o", color="k")
    axes[-1].set_title("KL(trained || base), nats/token" if any(v is not None for v in kl) else "KL not measured")
    axes[-1].set_ylim(bottom=0)
    for ax in axes:
        ax.set_xticks(x)
        ax.set_xlabel("round")
    fig.tight_layout()
    return fig


def _save_png(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)  # the temporary name has no .png to tell matplotlib
    finally:
        plt.close(fig)


def summary_line(rows: list[dict]) -> str:
    """First evaluated round -> last, in one log line."""
    if not rows:
        return "rounds: none evaluated yet"
    ends = [rows[0], rows[-1]] if len(rows) > 1 else rows

    def across(which: str, key: str) -> str:
        return " -> ".join(by_condition(r[which], key, CONDITIONS) for r in ends)

    kl = [r["kl_per_token"] for r in ends]
    kl = ", KL " + " -> ".join("n/a" if v is None else f"{v:.3f}" for v in kl) if any(v is not None for v in kl) else ""
    return (f"rounds {' -> '.join(str(r['round']) for r in ends)}: adoption {across('trained', 'identity_adoption')}, "
            f"leakage {across('trained', 'leakage')}{kl} (rounds.md)")
