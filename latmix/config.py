"""Hydra config -> `settings.Experiment`: every group built one way, checked before anything heavy loads.

Each yaml group is the settings dataclass of its stage, field for field (model -> ModelSettings,
quant -> QuantConfig, transform -> TransformConfig, calib -> CalibConfig, optim -> OptimConfig,
gptq -> GPTQSettings, eval -> EvalSettings, logger -> LoggerSettings), built by `settings.from_values`, which names the key
of any unknown or rejected value in a ConfigError. Three translations happen on the way: `name` keys
(quant, transform) are labels for records and tables only; a transform's `kv_placements` join its
placements only when the KV cache is quantized; a model path that exists locally is made absolute.

Torch-free: run.py calls build_experiment before it imports the pipeline. What needs the model (its
dimensions against the block sizes) is checked when the model's config is read
(`QuantConfig.check_dimensions`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from latmix.errors import ConfigError
from latmix.settings import (
    PPL_DATASETS,
    CalibConfig,
    EvalSettings,
    Experiment,
    GPTQSettings,
    LoggerSettings,
    ModelSettings,
    OptimConfig,
    QuantConfig,
    TransformConfig,
    from_values,
)

__all__ = ["ConfigError", "build_experiment", "resolve_local_path"]

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _section(cfg: DictConfig, key: str) -> dict[str, Any]:
    if key not in cfg or not isinstance(cfg[key], DictConfig):
        raise ConfigError(f"the config has no '{key}' group; pick one with {key}=<option>")
    return dict(OmegaConf.to_container(cfg[key], resolve=True))


def resolve_local_path(name_or_path: str) -> str:
    """A path that exists (from the working directory, then the project root), else the hub id as given."""
    for base in (Path.cwd(), PROJECT_ROOT):
        candidate = (base / name_or_path).expanduser()
        if candidate.exists():
            return str(candidate.resolve())
    return name_or_path


def _transform_values(values: dict[str, Any], kv_quantized: bool) -> dict[str, Any]:
    """transform/<name>.yaml without its label; kv_placements join the placements only when the KV
    cache is quantized (QuaRot/SpinQuant rotate q/k after RoPE only then)."""
    kv_placements = values.pop("kv_placements", None) or {}
    placements = dict(values.pop("placements", None) or {})
    if kv_quantized:
        placements.update(kv_placements)
    return {"placements": placements, **values}


def _eval_values(values: dict[str, Any]) -> dict[str, Any]:
    """eval/ with a perplexity text file looked up from the working directory, then the project root."""
    datasets = values.get("ppl_datasets") or ()
    values["ppl_datasets"] = [d if d in PPL_DATASETS else _local_file(str(d)) for d in datasets]
    return values


def _local_file(path: str) -> str:
    """The absolute path of a file that exists (from the working directory, then the project root), else as given."""
    for base in (Path.cwd(), PROJECT_ROOT):
        candidate = (base / path).expanduser()
        if candidate.is_file():
            return str(candidate.resolve())
    return path


def build_experiment(cfg: DictConfig) -> Experiment:
    """Turn a composed Hydra config into typed settings; ConfigError on the first bad value."""
    model = _section(cfg, "model")
    quant, transform = _section(cfg, "quant"), _section(cfg, "transform")
    quant_name, transform_name = str(quant.pop("name", "custom")), str(transform.pop("name", "custom"))
    if model.get("name_or_path") is not None:
        model["name_or_path"] = resolve_local_path(str(model["name_or_path"]))
    quant_config = from_values(QuantConfig, quant, "quant")
    return Experiment(
        model=from_values(ModelSettings, model, "model"),
        quant_name=quant_name,
        quant=quant_config,
        transform_name=transform_name,
        transform=from_values(
            TransformConfig, _transform_values(transform, quant_config.kv_format is not None), "transform"
        ),
        calib=from_values(CalibConfig, _section(cfg, "calib"), "calib"),
        optim=from_values(OptimConfig, _section(cfg, "optim"), "optim"),
        gptq=from_values(GPTQSettings, _section(cfg, "gptq"), "gptq"),
        eval=from_values(EvalSettings, _eval_values(_section(cfg, "eval")), "eval"),
        logger=from_values(LoggerSettings, _section(cfg, "logger"), "logger"),
        seed=int(cfg.get("seed", 0)),
        device=str(cfg.get("device", "auto")),
        force=bool(cfg.get("force", False)),
        results_dir=Path(str(cfg.paths.results_dir)).expanduser().resolve(),
    )
