"""One experiment, end to end: load -> transform -> calibrate -> quantize -> evaluate -> record -> W&B.

`run(cfg)` is what run.py calls under Hydra and what the tests call on a composed config. The
record is written (atomically) before anything is sent to W&B, so a tracker failure never loses
a run; a run whose record exists is skipped unless force=true.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import platform
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from omegaconf import DictConfig, OmegaConf

from latmix import export, figures, interrupt, logs, provenance, record, summary, tracking
from latmix.calibrate import calibrate
from latmix.config import build_experiment, identity_config
from latmix.data import calibration_batches
from latmix.errors import ConfigError
from latmix.evaluate import EvalResult, PerplexityText, eval_seq_len, evaluate, perplexity_texts
from latmix.gptq import gptq_quantize_model
from latmix.guard import RunGuard, guarded_run, tidy_recorded
from latmix.hooks import Hooks
from latmix.models import get_adapter, inject_channel_outliers, load_config, load_model, model_dimensions
from latmix.models.cache import cached_model, record_entry
from latmix.models.loading import check_sequence_length
from latmix.offload import offload_blocks
from latmix.quantize import QuantLinear, prepare_model, set_quantization
from latmix.settings import Experiment

log = logging.getLogger(__name__)

# Calibration sequences that probe activations (histograms) and the full-precision deviation.
PROBE_SEQUENCES = 2


class StageTimer:
    """Wall-clock seconds per pipeline stage, logged as each stage ends."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 3)
        log.info("stage %-10s %8.2f s", name, self.seconds[name])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def hydra_output_dir() -> Path | None:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else None


@contextlib.contextmanager
def settings_errors(what: str) -> Iterator[None]:
    """In the set-up stages every ValueError comes from the settings meeting the model: a ConfigError.

    Later stages raise ConfigError themselves where a setting is at fault, so that any other
    ValueError there (a bug) keeps its traceback.
    """
    try:
        yield
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(f"{what}: {err}") from err


def resolve_device(name: str) -> torch.device:
    """The device a run computes on: "auto" is the first CUDA device when there is one, else the CPU.

    A named device must exist here (a tensor is allocated on it): ConfigError naming `device` if not.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        torch.empty(0, device=name)
    except (RuntimeError, AssertionError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"device={name} is not available here ({reason}); use device=auto or device=cpu") from err
    return torch.device(name)


def model_source(exp: Experiment) -> tuple[str, dict[str, Any]]:
    """(what from_pretrained loads, the record's model section): a cached model names its manifest;
    either carries the weights' fingerprint by content (provenance.model_fingerprint)."""
    if exp.model.cache is None:
        section = {"name": exp.model.name, "name_or_path": exp.model.name_or_path}
    else:
        section = {"name": exp.model.name, **record_entry(cached_model(exp.model.cache)[1])}
    name = provenance.loaded_model(exp.model)
    return name, {**section, "fingerprint": provenance.model_fingerprint(name)}


def load_model_checked(exp: Experiment, device: torch.device, name: str) -> tuple[torch.nn.Module, Any]:
    """Load the model after checking its dimensions against the block sizes; hub failures -> ConfigError."""
    model_config = load_config(name, trust_remote_code=exp.model.trust_remote_code)
    exp.quant.check_dimensions(*model_dimensions(model_config))
    check_sequence_length(model_config, "calib.seq_len", exp.calib.seq_len)
    # An offloaded model is loaded into CPU memory; offload_blocks then moves what stays on the device.
    load_device = "cpu" if exp.calib.offload else device
    return load_model(name, exp.model.dtype, load_device, trust_remote_code=exp.model.trust_remote_code)


@torch.no_grad()
def reader_inputs(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per layer, the activation q/k/v quantize: the input of q_proj after its online transform."""
    adapter = get_adapter(model)
    captured: dict[str, torch.Tensor] = {}

    def capture(name: str):
        def pre_hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = module.transformed_input(args[0]) if isinstance(module, QuantLinear) else args[0]
            captured[name] = x.detach().float().cpu()

        return pre_hook

    with Hooks() as hooks:
        for i, layer in enumerate(adapter.layers()):
            hooks.pre(adapter.attn_readers(layer)[0], capture(f"layer{i}"))
        model(ids)
    return captured


def environment(device: torch.device) -> dict[str, Any]:
    """What a run's numbers depend on besides its config and code.

    The processor and the kernels torch picks for it belong here: MX rounding turns last-bit
    differences between two CPUs' matmuls into different codes, so a run reproduces bit for bit
    on the same machine, not across machines (README, "Thread count"). latmix.environment compares
    these between runs set side by side.
    """
    import lm_eval

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "lm_eval": lm_eval.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "cpu": cpu_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
    }


def cpu_name() -> str:
    """The processor's model name ('AMD EPYC', 'Intel(R) Xeon(R) ...'), or what platform knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def build_record(
    exp: Experiment,
    resolved: dict[str, Any],
    rid: str,
    evaluation: EvalResult,
    calibration: dict[str, Any],
    fidelity: dict[str, Any],
    timing: dict[str, float],
    device: torch.device,
    source: dict[str, Any],
) -> dict[str, Any]:
    return {
        "schema_version": record.SCHEMA_VERSION,
        "run_id": rid,
        "created": record.utc_now(),
        "git_sha": record.running_code().sha,
        "git_uncommitted": record.running_code().uncommitted,
        "config": resolved,
        "model": exp.model.name,
        "model_source": source,
        "quant": exp.quant_name,
        "transform": exp.transform_name,
        "weight_quantizer": exp.quant.weight_quantizer,
        "seed": exp.seed,
        "metrics": {
            "ppl": evaluation.ppl,
            "tasks": evaluation.tasks,
            "averages": evaluation.averages,
        },
        "eval": {
            "lm_eval_version": evaluation.lm_eval_version,
            "task_versions": evaluation.task_versions,
            "ppl_sources": evaluation.ppl_sources,
            "task_items": evaluation.task_items,
        },
        "calibration": calibration,
        "fidelity": fidelity,
        "timing": timing,
        "env": environment(device),
    }


def existing_record(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        return record.read_record(path)
    except record.RecordError as err:
        log.warning("%s; running again to replace it", err)
        return None


def check_recorded_inputs(rec: dict[str, Any], exp: Experiment, path: Path) -> None:
    """ConfigError if a text or the weights the recorded run read have changed since: its numbers are
    not this config's."""
    if changes := provenance.changed_inputs(rec, exp):
        raise ConfigError(
            f"run {rec['run_id']} is recorded at {path}, but {'; '.join(changes)}. Its numbers came from "
            "the old inputs: rerun with force=true to replace the record, or restore them to reuse it"
        )


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run one experiment from a composed config and return its result record."""
    logs.quiet_third_party()
    code = record.running_code()  # before any work: the record names the code this run starts with
    exp = build_experiment(cfg)
    resolved = identity_config(cfg)
    rid = record.run_id(resolved)
    path = record.record_path(exp.results_dir, rid)
    previous = existing_record(path)
    if previous is not None and not exp.force:
        check_recorded_inputs(previous, exp, path)
        moved = provenance.code_moved(previous, code.sha)
        log.info("run %s is already recorded at %s%s; skipping (force=true reruns it)",
                 rid, path, f" ({moved})" if moved else "")
        tidy_recorded(exp, rid)
        summary.log_run_summary(previous, exp.results_dir, recorded_earlier=True)
        return previous

    device = resolve_device(exp.device)
    # The run's lock (another process running it: RunInProgress, or wait=true), signal handling, the
    # results dir probed, leftovers of killed runs removed (latmix.guard).
    with guarded_run(exp, rid) as guard:
        if not exp.force and (previous := existing_record(path)) is not None:  # finished while we waited
            log.info("run %s was recorded at %s by another process; skipping", rid, path)
            return previous
        guard.start()  # force=true discards the calibration checkpoints; else they must be readable
        rec = _run_guarded(exp, device, resolved, rid, cfg, guard)
    summary.log_run_summary(rec, exp.results_dir)
    return rec


def _run_guarded(
    exp: Experiment, device: torch.device, resolved: dict[str, Any], rid: str, cfg: DictConfig, guard: RunGuard
) -> dict[str, Any]:
    path = guard.record_path
    log.info("run %s: model=%s quant=%s transform=%s seed=%d on %s",
             rid, exp.model.name, exp.quant_name, exp.transform_name, exp.seed, device)
    with tracking.start_run(exp, rid, resolved) as tracker:  # a failure marks the W&B run failed
        rec, figure_paths = execute(exp, device, resolved, rid, tracker, guard.ckpt_dir)
        record.write_record(path, rec)
        guard.finished()  # the calibration checkpoints have served
        log.info("record written to %s (%.1f s in all)", path, rec["timing"]["total"])
        tracker.log_record(rec, path, OmegaConf.to_yaml(cfg, resolve=True))
        if exp.logger.log_figures:
            tracker.log_figures(figure_paths)
    return rec


@dataclass(frozen=True)
class RunTokens:
    """The token ids one run works on, drawn for its seed before anything is transformed."""

    calib_ids: torch.Tensor  # calibration sequences (calib.n_samples x calib.seq_len), on the CPU
    calib_sha256: str  # of the calibration text they were drawn from
    heldout_ids: torch.Tensor  # PROBE_SEQUENCES from the calibration text's held-out split: the held-out KL
    probe_ids: torch.Tensor  # the first PROBE_SEQUENCES calibration sequences, on the device
    ppl_texts: list[PerplexityText]
    eval_seq_len: int  # the perplexity window


def run_tokens(exp: Experiment, model: torch.nn.Module, tokenizer: Any, device: torch.device) -> RunTokens:
    """Calibration, probe and perplexity tokens. The perplexity texts are tokenized here, at load, so
    that one too short for a window fails before calibration."""
    calib = exp.calib
    calib_ids, calib_sha256 = calibration_batches(
        tokenizer, calib.source, calib.n_samples, calib.seq_len, exp.seed, path=calib.path
    )
    heldout_ids, _ = calibration_batches(
        tokenizer, calib.source, PROBE_SEQUENCES, calib.seq_len, exp.seed, split="validation", path=calib.path
    )
    seq_len = eval_seq_len(model, exp.eval.max_seq_len)
    return RunTokens(
        calib_ids, calib_sha256, heldout_ids, calib_ids[:PROBE_SEQUENCES].to(device),
        perplexity_texts(tokenizer, exp.eval, seq_len), seq_len,
    )


def execute(
    exp: Experiment, device: torch.device, resolved: dict[str, Any], rid: str, tracker: tracking.Tracker,
    checkpoint_dir: Path,
) -> tuple[dict[str, Any], dict[str, Path]]:
    """The pipeline proper: returns the record (not yet written) and the figures it saved. Calibration
    checkpoints go to `checkpoint_dir`, the run guard's, which removes them once the record is written."""
    seed_everything(exp.seed)
    timer = StageTimer()
    start = time.perf_counter()

    with timer.stage("load"), settings_errors("model / calib data"):
        name, source = model_source(exp)
        model, tokenizer = load_model_checked(exp, device, name)
        if exp.model.outliers is not None:
            inject_channel_outliers(model, **exp.model.outliers)
        fp_model = copy.deepcopy(model).eval().requires_grad_(False)
        if exp.calib.offload:
            offload_blocks(model, device)
            offload_blocks(fp_model, device)
        tokens = run_tokens(exp, model, tokenizer, device)
        calib_ids, probe_ids = tokens.calib_ids, tokens.probe_ids
        acts_before = reader_inputs(fp_model, probe_ids)

    # The full-precision deviation from the original model (DESIGN.md: a non-orthogonal residual map
    # changes the function; ~0 otherwise), on sequences the calibration also sees: after the transforms
    # are placed, and after calibration (before GPTQ writes quantized weights, which no switch undoes).
    with timer.stage("transform"):
        with settings_errors(f"transform={exp.transform_name} on this model"):
            prepared = prepare_model(model, exp.transform, exp.quant, deviation_ids=probe_ids)
        deviation_before = prepared.fp_deviation()
        learned = export.learnable_transforms(prepared)  # kept: calibration folds most of them away

    with timer.stage("calibrate"), interrupt.deferred("calibration"):  # signals: a checkpoint, then stop
        report = calibrate(
            prepared, fp_model, calib_ids, exp.calib, exp.optim, checkpoint_dir,
            heldout_ids=tokens.heldout_ids, on_step=tracker.log_step,
        )
        calibration = {
            **report.as_record(), "data_sha256": tokens.calib_sha256, "text": provenance.calibration_text(exp.calib),
        }
        tracker.log_transforms(rid, export.save_learned(learned, exp.results_dir, rid))
    fidelity = {"before_calibration": deviation_before, "after_calibration": prepared.fp_deviation()}

    with timer.stage("quantize"):
        if exp.quant.weight_quantizer == "gptq" and exp.quant.weight_format is not None:
            gptq_quantize_model(prepared, calib_ids, exp.quant, exp.gptq)
        set_quantization(model, weights=exp.quant.weight_format is not None, acts=exp.quant.act_format is not None)

    acts_after = reader_inputs(model, probe_ids)
    del fp_model

    with timer.stage("evaluate"), logs.quiet_evaluation():
        evaluation = evaluate(model, tokenizer, exp.eval, tokens.ppl_texts)

    if exp.export:
        with timer.stage("export"):
            export.export_model(prepared, tokenizer, exp, rid, record.export_dir(exp.results_dir, rid), resolved)

    timer.seconds["total"] = round(time.perf_counter() - start, 3)
    rec = build_record(exp, resolved, rid, evaluation, calibration, fidelity, timer.seconds, device, source)
    output_dir = hydra_output_dir() or exp.results_dir / "outputs" / rid
    return rec, save_figures(acts_before, acts_after, calibration["per_layer"], output_dir)


def save_figures(
    before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], per_layer: list[dict], output_dir: Path
) -> dict[str, Path]:
    paths = {"activations": figures.activation_histograms(before, after, output_dir / "activations.png")}
    if any(row.get("bound_after") is not None or row.get("error_after") is not None for row in per_layer):
        paths["bound_vs_error"] = figures.bound_vs_error(per_layer, output_dir / "bound_vs_error.png")
    return paths
