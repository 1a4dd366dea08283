"""Run one latmix experiment (or, with -m, a sweep through the configured Hydra launcher).

    python run.py                                           # the embedded default
    python run.py model=llama3-8b quant=mxfp4 transform=affine
    python run.py -m transform=identity,hadamard,affine seed=0,1,2
"""

import sys

import hydra
from omegaconf import DictConfig

from latmix.config import build_experiment
from latmix.errors import ConfigError
from latmix.preemption import slurm_task

# A config that cannot work exits with one line and status 2; a real bug keeps its traceback.
CONFIG_ERROR_EXIT = 2


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
@slurm_task
def main(cfg: DictConfig) -> None:
    try:
        # The settings are checked (torch-free) before the pipeline, and torch with it, is imported.
        build_experiment(cfg)
        from latmix.experiment import run

        run(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(CONFIG_ERROR_EXIT)


if __name__ == "__main__":
    main()
