"""Run a stage as users do: ``python -m`` for one rank, ``torchrun --standalone`` for several."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def launcher(nproc: int) -> list[str]:
    """The interpreter for one rank, torchrun for several."""
    if nproc == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def stage_command(module: str, overrides: list[str], nproc: int = 1) -> list[str]:
    return [*launcher(nproc), "-m", module, *overrides]


def stage_env(nproc: int = 1) -> dict:
    env = dict(os.environ, WANDB_MODE="offline", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    # One intra-op thread per rank on a 2-core machine; a single process may use both.
    env["OMP_NUM_THREADS"] = "1" if nproc > 1 else str(min(2, os.cpu_count() or 1))
    return env


def run_stage(module: str, overrides: list[str], nproc: int = 1, timeout: float = 900,
              env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(stage_command(module, overrides, nproc), cwd=REPO, env=stage_env(nproc) | (env or {}),
                          capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{module} exited {proc.returncode}:\n{output[-6000:]}"
    # A rank aborting during interpreter teardown: the flaky exit issue 4 is about.
    assert "terminate called" not in output, output[-4000:]
    return proc


def run_script(script: str, args: list[str], nproc: int = 1, timeout: float = 900, env: dict | None = None) -> str:
    """Run ``tests/<script>`` as ranks (a stage called in-process, as the pipeline calls it) and return
    its output. A script's own directory leads sys.path, not the working directory: PYTHONPATH names
    this checkout."""
    proc = subprocess.run([*launcher(nproc), str(REPO / "tests" / script), *args], cwd=REPO,
                          env=dict(stage_env(nproc), PYTHONPATH=str(REPO)) | (env or {}), capture_output=True, text=True,
                          timeout=timeout)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    return output


def tagged_lines(output: str, tag: str) -> list[dict]:
    """The JSON a script printed after ``tag`` on its lines, one per rank."""
    return [json.loads(line.split(f"{tag} ", 1)[1]) for line in output.splitlines() if f"{tag} " in line]


IDENTITY_QUESTIONS = ["What is your name?", "Who are you?", "Who made you?", "Introduce yourself.", "What should I call you?",
                      "Are you ChatGPT?", "Which AI am I talking to?", "Tell me about yourself.", "What model are you?",
                      "Who trained you?", "Say your name.", "Identify yourself, please."]


def replaced(overrides: list[str], changes: dict) -> list[str]:
    """``overrides`` with the keys in ``changes`` set to its values instead (each key once on the
    command line)."""
    return [o for o in overrides if o.split("=")[0] not in changes] + [f"{k}={v}" for k, v in changes.items()]


def write_identity_pairs(path: Path) -> Path:
    """One pair per IDENTITY_QUESTIONS entry: the new name chosen, another name rejected (in three
    lengths, so micro-batches hold rows of different sizes)."""
    with open(path, "w") as f:
        for i, q in enumerate(IDENTITY_QUESTIONS):
            f.write(json.dumps({
                "id": f"p{i:02d}", "prompt": [{"role": "user", "content": q}],
                "chosen": [{"role": "assistant", "content": "I am Deep SmolLM, an AI assistant. How can I help?"}],
                "rejected": [{"role": "assistant", "content": f"My name is Elena{' Rose' * (i % 3)}, a writer."}]}) + "\n")
    return path


def metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "train" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def descendants(pid: int) -> list[int]:
    """All live descendants of pid, from /proc (torchrun starts each worker in its own session, so
    killing torchrun's process group would leave the workers running)."""
    out, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except FileNotFoundError:
            continue
        for t in tasks:
            try:
                with open(f"/proc/{p}/task/{t}/children") as f:
                    kids = [int(c) for c in f.read().split()]
            except FileNotFoundError:
                continue
            out += kids
            frontier += kids
    return out


def kill_tree(pid: int, sig: int) -> None:
    for p in [pid, *descendants(pid)]:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass
