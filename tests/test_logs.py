"""Quiet logs: each third-party noise is silenced where it starts, latmix's own lines and warnings stay."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from latmix import logs

ROOT = Path(__file__).resolve().parent.parent
# What a run's log held before (docs/harness.md, "Logs"): none of it may come back.
NOISE = ("torchao", "_pytree", "Token indices sequence length", "lm_eval", "Loading weights", "bootstrapping",
         "Running loglikelihood", "Tokenizing inputs", "Overwriting default num_fewshot", "Detected no triton")


@pytest.fixture
def quiet():
    logs.quiet_third_party()


def emitted(caplog, logger: str, level: int, message: str) -> bool:
    caplog.clear()
    logging.getLogger(logger).log(level, message)
    return any(record.getMessage() == message for record in caplog.records)


def test_the_named_messages_are_dropped_and_their_loggers_neighbours_kept(quiet, caplog):
    tokenizer_warning = ("Token indices sequence length is longer than the specified maximum sequence length for "
                         "this model (103562 > 512). Running this sequence through the model will result in "
                         "indexing errors")
    with caplog.at_level(logging.DEBUG):
        # caplog's handler sits on the root logger: reattach it to the two that do not propagate.
        logging.getLogger("transformers").addHandler(caplog.handler)
        try:
            assert not emitted(caplog, "transformers.tokenization_utils_base", logging.WARNING, tokenizer_warning)
            assert emitted(caplog, "transformers.tokenization_utils_base", logging.WARNING, "a real tokenizer problem")
        finally:
            logging.getLogger("transformers").removeHandler(caplog.handler)
        assert not emitted(caplog, "lm_eval.evaluator", logging.WARNING, "Overwriting default num_fewshot of x from None to 0")
        assert not emitted(caplog, "lm_eval.evaluator", logging.INFO, "Setting random seed to 0")
        assert emitted(caplog, "lm_eval.evaluator", logging.WARNING, "a task has no test split")
        assert not emitted(caplog, "torchao", logging.WARNING, "Failed to load /x/_C_mxfp8.so")
        assert not emitted(caplog, "torch.utils._pytree", logging.WARNING,
                           "<enum 'KernelPreference'> is an Enum subclass and is now natively supported")


def test_latmix_lines_and_python_warnings_are_untouched(quiet, caplog):
    with caplog.at_level(logging.INFO):
        assert emitted(caplog, "latmix.experiment", logging.INFO, "stage load 1.00 s")
        assert emitted(caplog, "latmix.calibrate", logging.WARNING, "a transform's condition number exploded")
    with pytest.warns(UserWarning, match="still shown"):
        import warnings

        warnings.warn("still shown", UserWarning, stacklevel=1)


def test_quiet_third_party_is_idempotent(quiet):
    logs.quiet_third_party()
    filters = logging.getLogger("lm_eval.evaluator").filters
    assert sum(isinstance(f, logs.MessageFilter) for f in filters) == 1


def test_the_evaluation_scope_hides_progress_bars_and_the_bootstrap_print_only(capsys):
    from tqdm import tqdm

    with logs.quiet_evaluation():
        for _ in tqdm(range(3), desc="Running loglikelihood requests", disable=False):
            pass
        print("bootstrapping for stddev: perplexity")
        print("a line that matters")
    for _ in tqdm(range(2), desc="calibrate end_to_end", disable=False):  # after the scope: bars again
        pass
    out = capsys.readouterr()
    assert "Running loglikelihood" not in out.err and "calibrate end_to_end" in out.err
    assert "bootstrapping" not in out.out and "a line that matters" in out.out


def test_a_run_imports_no_torchao():
    pytest.importorskip("torchao")  # a dev extra: where it is installed, transformers would import it
    code = ("import sys; from latmix.logs import quiet_third_party; quiet_third_party(); "
            "import latmix.experiment, latmix.export; from transformers import AutoModelForCausalLM; "
            "print('torchao' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"
    assert not any(noise in out.stderr for noise in NOISE), out.stderr


@pytest.mark.slow
def test_a_run_logs_latmix_lines_only(tiny_checkpoint, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    env.pop("WANDB_API_KEY", None)
    out = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "model=tiny", f"model.name_or_path={tiny_checkpoint}", f"paths.results_dir={tmp_path}",
         f"hydra.run.dir={tmp_path}/out", "quant.weight_quantizer=rtn", "transform=hadamard", "calib.n_samples=4",
         "calib.seq_len=64", "eval=quick", "eval.max_seq_len=256", "eval.max_ppl_tokens=512", "eval.limit=4"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stdout + out.stderr
    assert not [noise for noise in NOISE if noise in log], log
    prefixed = [line for line in out.stdout.splitlines() if line.startswith("[")]
    assert all("][latmix." in line for line in prefixed), prefixed
    for expected in ("run ", "stage load", "stage evaluate", "record written to", "wandb sync", "summary"):
        assert expected in out.stdout
