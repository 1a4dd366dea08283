"""Run one latmix experiment (or, with -m, a sweep through the configured Hydra launcher).

    python run.py                                           # the embedded default
    python run.py model=llama3-8b quant=mxfp4 transform=affine
    python run.py -m transform=identity,hadamard,affine seed=0,1,2
    python run.py transform=identity,hadamard,affine seed=0,1,2 -m     # -m may stand anywhere

Exit status: 0 done (or already recorded); 2 a config or input that cannot work (one line saying what
to change, before any work); 75 the same run is in progress in another process (one line saying
where; wait=true waits instead; in a -m sweep that run is skipped and the sweep goes on); 128 + the
signal's number when SIGINT (130), SIGUSR1 (138) or SIGTERM (143) stopped it (one line naming the
checkpoint a rerun resumes from); 1 a bug (traceback).
"""

import sys

import hydra
from omegaconf import DictConfig

from latmix.command_line import multirun_flag_first
from latmix.config import build_experiment
from latmix.errors import ConfigError
from latmix.interrupt import Interrupted
from latmix.lock import RunInProgress
from latmix.preemption import slurm_task

# A config that cannot work exits with one line and status 2; a real bug keeps its traceback.
CONFIG_ERROR_EXIT = 2
# The same run is in progress elsewhere (EX_TEMPFAIL: try again later).
IN_PROGRESS_EXIT = 75


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
@slurm_task
def main(cfg: DictConfig) -> None:
    try:
        # The settings are checked (torch-free) before the pipeline, and torch with it, is imported.
        build_experiment(cfg)
        from latmix.logs import quiet_third_party

        quiet_third_party()  # before the pipeline's imports (transformers would import torchao)
        from latmix.experiment import run

        run(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(CONFIG_ERROR_EXIT)
    except RunInProgress as err:
        if _in_a_sweep():
            print(f"skipped: {err}", file=sys.stderr)
            return
        print(f"error: {err}", file=sys.stderr)
        sys.exit(IN_PROGRESS_EXIT)
    except Interrupted as err:
        print(err, file=sys.stderr)
        sys.exit(err.exit_status)
    except KeyboardInterrupt:  # before the run's handlers were installed (while importing)
        print("interrupted by SIGINT before the run started; nothing to resume", file=sys.stderr)
        sys.exit(130)


def _in_a_sweep() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


if __name__ == "__main__":
    sys.argv = multirun_flag_first(sys.argv)
    main()
