"""Run the evaluation in this process, as the pipeline does before the next round samples, and print
(one JSON line per rank) whether rank 0's report was written by the time evaluate.run returned here.
Launched by tests/test_evaluate.py under torchrun for 2 ranks."""

import json
import os
import sys
from pathlib import Path

from dpo_dist import dist, evaluate
from dpo_dist.config import compose

if __name__ == "__main__":
    cfg = compose(sys.argv[1:])
    evaluate.run(cfg)
    written = (Path(cfg.run_dir) / "eval" / "report.json").is_file()
    # One write per line: print() writes the text and its newline apart, and two ranks share stdout.
    os.write(1, ("AFTER " + json.dumps({"rank": dist.read_env().rank, "report_written": written}) + "\n").encode())
