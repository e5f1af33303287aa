"""Iterative on-policy DPO: what round k of a ``rounds.num > 1`` pipeline runs with.

    python -m dpo_dist.pipeline rounds.num=2                   # round 1 as today, then round 2 from its policy
    python -m dpo_dist.pipeline rounds.num=3 rounds.num_train=120 rounds.reference=base
    python -m dpo_dist.judge [overrides] --cfg job | python -m dpo_dist.rounds RUN_DIR   # how many (pipeline.sbatch)

Round k lives in ``<run_dir>/round-<k>/`` with its own stage folders and fingerprints, so a killed
run resumes inside the round it was in and a finished round is reused. From round 2 on, generation
samples from round k-1's exported policy (``rounds.previous``), so the judge sees the trained
model's own mistakes; the reference and the starting weights are round k-1's policy or the base
(``rounds.reference``, ``rounds.init``). Evaluation always compares against the base model.

Prompts: the shipped pools are shuffled, so each round takes the next contiguous slice: identity
prompts from the start of ``prompts.train`` on, general prompts from the end of ``prompts.general``
backwards (evaluation keeps its first ``eval.num_general``). No prompt is trained on twice while the
pool lasts; once earlier rounds have used it up, a round goes on from its start again, with the
prompts trained on longest ago (a warning as the round starts says how many). A pool too small for one
round fails at start-up, naming the key.

The settings of a round are a dict of dotted keys (``values``): applied to the config in this
process (``apply``) and passed as Hydra overrides to a child process (``overrides``), so both
agree.
"""

from __future__ import annotations

import re
import sys
from dataclasses import replace
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from dpo_dist.config import Config, ConfigError, job_rounds, to_config
from dpo_dist.data import check_leak_langs, load_prompt_set


def round_dir(run_dir: str | Path, k: int) -> Path:
    return Path(run_dir) / f"round-{k}"


def sizes(cfg: Config) -> dict[str, list[int]]:
    """Prompts each round takes from each pool: round 1 prompts.*, later rounds rounds.* (-1: the same)."""
    r, p = cfg.rounds, cfg.prompts

    def per_round(first: int, later: int) -> list[int]:
        return [first] + [later if later >= 0 else first] * (r.num - 1)

    return {"num_train": per_round(p.num_train, r.num_train),
            "num_train_general": per_round(p.num_train_general, r.num_train_general),
            "num_train_leak": per_round(p.num_train_leak, r.num_train_leak)}


# rounds.later may not move these: values() and the Slurm script set them per round, and every round
# loads the same base model, teaches the same identity and is evaluated the same way on the same
# held-out prompts (evaluation reads generation.vllm_dtype too).
DERIVED = ("run_dir", "data.pairs", "prompts", "rounds", "train.checkpoint_dir", "stages")
SHARED = ("model", "eval", "identity", "generation.vllm_dtype")
# rounds.<key> (None: round 1's) -> the setting it gives every round after the first.
LATER_KEYS = {"leak_category": "prompts.leak_category", "leak_langs": "prompts.leak_langs",
              "leak_search_candidates": "generation.leak_search_candidates"}


def _touches(key: str, keys: tuple[str, ...]) -> bool:
    """Whether setting ``key`` sets one of ``keys``: the key itself, one under it, or a group holding it."""
    return any(key == k or key.startswith(k + ".") or k.startswith(key + ".") for k in keys)


def later(cfg: Config) -> dict[str, object]:
    """rounds.later's key:value entries as settings, each value typed as Hydra types a command-line
    value (3e-5 a float, opener a string)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser, out = OverridesParser.create(), {}
    for entry in cfg.rounds.later:
        key, sep, value = entry.partition(":")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"rounds.later: {entry!r} is not key:value (e.g. optim.lr:3e-5)")
        if _touches(key, DERIVED):
            raise ConfigError(f"rounds.later: {key} is set per round by the rounds themselves (round directory, "
                              f"prompt slices, previous policy, stage); the rounds.* keys set a later round's prompts")
        for name, sets in LATER_KEYS.items():
            if key == sets and getattr(cfg.rounds, name) is not None:
                raise ConfigError(f"rounds.later: {key} is set for the later rounds by rounds.{name}="
                                  f"{getattr(cfg.rounds, name)} already; set one of the two")
        if _touches(key, SHARED):
            raise ConfigError(f"rounds.later: {key} must be the same in every round, so that every round is "
                              f"measured against the same base model on the same held-out prompts")
        try:
            parsed = parser.parse_override(f"{key}={value.strip()}")
        except Exception as e:
            raise ConfigError(f"rounds.later: {entry!r}: {str(e).splitlines()[0]}") from None
        # A child process (vLLM generation, a Slurm step) gets the value back as an override: refuse
        # what would not read back the same (a sweep such as an unquoted comma, null, a dict).
        if parsed.is_sweep_override() or \
                parser.parse_override(overrides({key: parsed.value()})[0]).value() != parsed.value():
            raise ConfigError(f"rounds.later: {entry!r}: not a single value a child process reads back the same; "
                              f"quote text with commas ({key}:'a, b')")
        out[key] = parsed.value()
    return out


def check(cfg: Config) -> None:
    """Fail at start-up, naming the key, when a pool cannot give one round its prompts (``reuse``
    says when a round trains on earlier rounds' prompts again), when prompts.leak_langs names a
    language no general prompt is in, or when rounds.later names a setting the rounds derive, no
    setting at all, or a value of the wrong type."""
    check_later(cfg)
    check_leak_langs(cfg.prompts)
    if cfg.rounds.leak_langs is not None:
        check_leak_langs(replace(cfg.prompts, leak_langs=list(cfg.rounds.leak_langs)), key="rounds.leak_langs")
    if cfg.prompts.num_train < 0:
        raise ConfigError("prompts.num_train: -1 (the whole pool) leaves no fresh prompts for round 2; set a number")
    if cfg.eval.num_general < 0:
        raise ConfigError("eval.num_general: -1 (every general prompt training leaves) changes with each round's "
                          "slice, so the rounds would be evaluated on different prompts; set a number")
    pools = _pools(cfg)
    (identity, identity_size), (used, general_size) = pools["identity"], pools["general"]
    if max(identity) > identity_size:
        raise ConfigError(f"rounds.num_train: a round takes {max(identity)} identity prompts, more than the "
                          f"{identity_size} of prompts.train={cfg.prompts.train!r}")
    if max(used) > general_size:
        raise ConfigError(f"rounds.num_train_general (+ num_train_leak): a round takes {max(used)} general prompts, "
                          f"which with eval.num_general={cfg.eval.num_general} is more than the "
                          f"{general_size + cfg.eval.num_general} of prompts.general={cfg.prompts.general!r}")


def _pools(cfg: Config) -> dict[str, tuple[list[int], int]]:
    """Per pool, the prompts each round takes from it and how many it holds to train on (the general
    pool's evaluation prompts apart)."""
    n = sizes(cfg)
    return {"identity": (n["num_train"], len(load_prompt_set(cfg.prompts.train, key="prompts.train", cfg=cfg.prompts))),
            "general": ([g + l for g, l in zip(n["num_train_general"], n["num_train_leak"])],
                        len(load_prompt_set(cfg.prompts.general, key="prompts.general", cfg=cfg.prompts))
                        - cfg.eval.num_general)}


def reuse(cfg: Config, k: int) -> str:
    """What round k trains on again, the pools used up by the rounds before it ("" when nothing): one
    line for the log of the round (a Slurm step of round k logs it too)."""
    notes = []
    for pool, (taken, size) in _pools(cfg).items():
        if again := reused(taken, size)[k - 1]:
            apart = ", the evaluation's apart" if pool == "general" else ""
            notes.append(f"{again} of its {taken[k - 1]} {pool} prompts ({size} to train on{apart})")
    return (f"round {k} trains again on {' and '.join(notes)}: the rounds before it used the pool up, so the "
            f"prompts trained on longest ago come back, after the fresh ones") if notes else ""


def check_later(cfg: Config) -> None:
    """rounds.later's entries, checked as check() does, whatever rounds.num is: a sweep over
    rounds.num=1,2 fails in its first job, not its second."""
    if not cfg.rounds.later:
        return
    try:
        # An entry that is no key:value, or a derived key, fails in later(); one round 2 could not
        # run with (the wrong type, a judge setting the judge refuses), in apply().
        apply(cfg, values(cfg, 2) if cfg.rounds.num > 1 else later(cfg))
    except ConfigError as e:
        raise ConfigError(str(e) if str(e).startswith("rounds.later:") else f"rounds.later: {e}") from None
    except Exception as e:  # an unknown key or a value of the wrong type, from OmegaConf
        key = getattr(e, "full_key", None)
        raise ConfigError(f"rounds.later: {key + ': ' if key else ''}{type(e).__name__}: "
                          f"{str(e).splitlines()[0]}") from None


def reused(taken: list[int], size: int) -> list[int]:
    """How many of its prompts each round takes again, when rounds take ``taken`` prompts one after
    the other from a pool of ``size`` that goes on from its start once used up (data.window)."""
    return [max(0, min(t, sum(taken[:k + 1]) - size)) for k, t in enumerate(taken)]


def values(cfg: Config, k: int) -> dict[str, object]:
    """Round k's settings, as dotted keys, from the whole run's ``cfg`` (whose run_dir is the root)."""
    n = sizes(cfg)
    here = round_dir(cfg.run_dir, k)
    out: dict[str, object] = {
        "run_dir": str(here),
        # Resolved from the root's run_dir when the config was composed: every round judges its own.
        "data.pairs": str(here / "judge" / "pairs.jsonl"),
        "rounds.previous": str(round_dir(cfg.run_dir, k - 1) / "train" / "final") if k > 1 else "",
        "prompts.skip_train": sum(n["num_train"][:k - 1]),
        "prompts.skip_general": sum(n["num_train_general"][:k - 1]) + sum(n["num_train_leak"][:k - 1]),
        **{f"prompts.{key}": n[key][k - 1] for key in n},
    }
    for name, sets in LATER_KEYS.items():
        if k > 1 and (value := getattr(cfg.rounds, name)) is not None:
            out[sets] = list(value) if isinstance(value, list) else value
    if cfg.train.checkpoint_dir:
        out["train.checkpoint_dir"] = str(Path(cfg.train.checkpoint_dir) / f"round-{k}")
    if k > 1:
        out.update(later(cfg))
    return out


def apply(cfg: Config, settings: dict[str, object]) -> Config:
    """``cfg`` with ``settings`` set, validated again (as at start-up)."""
    tree = OmegaConf.structured(cfg)
    for key, value in settings.items():
        OmegaConf.update(tree, key, value, merge=False)
    return to_config(tree)


def overrides(settings: dict[str, object]) -> list[str]:
    """``settings`` as Hydra command-line overrides; a later override of the same key wins, so these
    go after the user's."""
    return [f"{k}={hydra_quoted(v) if isinstance(v, str) else v}" for k, v in settings.items()]


def hydra_quoted(text: str, interpolations: bool = True) -> str:
    """``text`` as a quoted Hydra override value. In quotes Hydra unescapes a backslash only before a
    quote or at the end, so only those are doubled; with ``interpolations=False`` a ``${`` is
    escaped (and the backslashes before it doubled) so that OmegaConf keeps it as text."""
    body = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", text)
    body = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, body)
    if not interpolations:
        body = re.sub(r"(\\*)\$\{", lambda m: m.group(1) * 2 + "\\${", body)
    return f"'{body}'"


def main(argv: list[str] | None = None) -> None:
    """Print how many rounds a run has (config.job_rounds), reading the job's config as ``--cfg job``
    prints it on stdin; the argument is the run_dir. slurm/pipeline.sbatch asks this way, through
    the stages' own Hydra app, so that whatever a stage accepts (``--config-dir``, an experiment
    file) counts the same:
    ``python -m dpo_dist.judge "$@" --cfg job | python -m dpo_dist.rounds "$RUN_DIR"``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.exit("usage: python -m dpo_dist.judge [overrides] --cfg job | python -m dpo_dist.rounds RUN_DIR")
    try:
        job = yaml.safe_load(sys.stdin.read())
        if not isinstance(job, dict):  # the config did not compose: its own error is above
            raise ValueError("no job config on stdin")
        print(job_rounds(job, args[0]))
    except (ValueError, yaml.YAMLError) as e:
        print(f"dpo_dist.rounds: error: {str(e).splitlines()[0]}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
