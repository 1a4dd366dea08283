"""run.py takes -m anywhere on its line, where Hydra alone would stop at the first override."""

from conftest import run_script

from latmix.command_line import multirun_flag_first


def test_the_multirun_flag_moves_ahead_of_the_overrides_and_nothing_else_moves():
    argv = ["run.py", "quant=nvfp4", "-m", "seed=0,1", "--config-name", "config"]
    assert multirun_flag_first(argv) == ["run.py", "-m", "quant=nvfp4", "seed=0,1", "--config-name", "config"]
    assert multirun_flag_first(["run.py", "seed=0", "--multirun"]) == ["run.py", "--multirun", "seed=0"]


def test_a_line_without_the_flag_is_left_as_it_is():
    argv = ["run.py", "-c", "job", "quant=mxfp4"]
    assert multirun_flag_first(argv) == argv


def test_run_py_reads_a_trailing_m_as_a_sweep_not_as_an_unrecognized_argument():
    def stderr(*args: str) -> str:
        out = run_script("run.py", *args, timeout=120)
        assert out.returncode != 0
        return out.stderr

    # A group option that does not exist fails the same way wherever -m stands: Hydra read the line.
    trailing = stderr("model=tiny", "transform=no_such_map", "-m")
    assert "unrecognized arguments" not in trailing
    assert "no_such_map" in trailing
    assert trailing == stderr("-m", "model=tiny", "transform=no_such_map")
