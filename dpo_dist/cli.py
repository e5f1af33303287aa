"""The entry point every stage shares: Hydra composes ``conf/``, the tree becomes the typed Config
(all validation at start-up), and the process group is torn down on the way out."""

from __future__ import annotations

import logging
import os
from typing import Callable

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from dpo_dist import dist
from dpo_dist.config import CONF_DIR, Config, to_config


def stage_main(run: Callable[[Config], object]) -> Callable[[], None]:
    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)
    def main(raw: DictConfig) -> None:
        logging.basicConfig(level=os.environ.get("DPO_DIST_LOG_LEVEL", "INFO"),
                            format=f"%(asctime)s [rank {dist.read_env().rank}] %(levelname)s %(name)s: %(message)s",
                            force=True)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            # Each sweep job gets its own run directory (Hydra's per-job output dir).
            OmegaConf.update(raw, "run_dir", HydraConfig.get().runtime.output_dir)
        cfg = to_config(raw)
        try:
            run(cfg)
        except BaseException:
            dist.shutdown(clean=False)
            raise
        dist.shutdown()

    return main
