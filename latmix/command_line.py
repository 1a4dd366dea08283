"""run.py's command line, made forgiving where Hydra's is not."""

from __future__ import annotations

# Hydra's multirun flag, which takes no value, so moving it cannot separate a flag from its value.
# argparse stops reading overrides at the first flag, so `run.py quant=nvfp4 -m seed=0,1` would fail
# with "unrecognized arguments" if -m stayed there.
MULTIRUN_FLAGS = ("-m", "--multirun")


def multirun_flag_first(argv: list[str]) -> list[str]:
    """argv with -m/--multirun moved ahead of the overrides, so it may stand anywhere on the line."""
    program, args = argv[:1], argv[1:]
    flags = [a for a in args if a in MULTIRUN_FLAGS]
    return program + flags + [a for a in args if a not in MULTIRUN_FLAGS]
