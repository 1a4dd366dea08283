"""Hydra config -> the typed settings of every module, checked early with messages that say what to change.

The yaml groups mirror the dataclasses of the modules they feed field for field (quant -> QuantConfig,
transform -> TransformConfig, calib -> CalibConfig, optim -> OptimConfig); `name` keys are labels for
records and tables only. Anything wrong in a config raises ConfigError before a model is loaded,
except the checks that need the model's dimensions (`check_model_dimensions`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from latmix.calibrate import CalibConfig
from latmix.errors import ConfigError
from latmix.evaluate import PPL_DATASETS, EvalSettings
from latmix.optim import OptimConfig
from latmix.quantize import QuantConfig, TransformConfig
from latmix.tracking import LoggerSettings

PROJECT_ROOT = Path(__file__).resolve().parent.parent
EVAL_SUITES = ("local", "lm_eval")
LOGGER_BACKENDS = ("wandb", "none")
WANDB_MODES = ("auto", "online", "offline", "disabled")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ModelSettings:
    name: str
    name_or_path: str
    dtype: torch.dtype
    trust_remote_code: bool
    outliers: dict[str, Any] | None


@dataclass(frozen=True)
class Experiment:
    """Everything one run needs, typed and validated."""

    model: ModelSettings
    quant_name: str
    quant: QuantConfig
    transform_name: str
    transform: TransformConfig
    calib: CalibConfig
    optim: OptimConfig
    eval: EvalSettings
    logger: LoggerSettings
    seed: int
    device: torch.device
    force: bool
    results_dir: Path


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def _section(cfg: DictConfig, key: str) -> dict[str, Any]:
    if key not in cfg or not isinstance(cfg[key], DictConfig):
        raise ConfigError(f"the config has no '{key}' group; pick one with {key}=<option>")
    return dict(_plain(cfg[key]))


def build_dataclass(cls: type, values: dict[str, Any], where: str) -> Any:
    """cls(**values) with unknown keys and rejected values reported as `where.key`."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}; {cls.__name__} takes {', '.join(sorted(names))}"
        )
    try:
        return cls(**values)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from err


def resolve_local_path(name_or_path: str) -> str:
    """A path that exists (from the working directory, then the project root), else the hub id as given."""
    for base in (Path.cwd(), PROJECT_ROOT):
        candidate = (base / name_or_path).expanduser()
        if candidate.exists():
            return str(candidate.resolve())
    return name_or_path


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"device={name!r} is not a torch device; use auto, cpu, cuda or cuda:N") from err


def build_model_settings(values: dict[str, Any]) -> ModelSettings:
    dtype = values.get("dtype", "float32")
    if dtype not in DTYPES:
        raise ConfigError(f"model.dtype={dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    outliers = values.get("outliers")
    if outliers is not None and not {"n_channels", "scale", "seed"} <= set(outliers):
        raise ConfigError("model.outliers needs n_channels, scale and seed (and optionally points), or null")
    return ModelSettings(
        name=str(values["name"]),
        name_or_path=resolve_local_path(str(values["name_or_path"])),
        dtype=DTYPES[dtype],
        trust_remote_code=bool(values.get("trust_remote_code", False)),
        outliers=outliers,
    )


def build_quant_config(values: dict[str, Any]) -> QuantConfig:
    values.pop("name", None)
    return build_dataclass(QuantConfig, values, "quant")


def build_transform_config(values: dict[str, Any], kv_quantized: bool) -> TransformConfig:
    """TransformConfig from transform/<name>.yaml; its kv_placements join the placements only when
    the KV cache is quantized (QuaRot/SpinQuant rotate q/k after RoPE only then)."""
    values.pop("name", None)
    kv_placements = values.pop("kv_placements", None) or {}
    placements = dict(values.pop("placements", None) or {})
    if kv_quantized:
        placements.update(kv_placements)
    return build_dataclass(TransformConfig, {"placements": placements, **values}, "transform")


def build_eval_settings(values: dict[str, Any]) -> EvalSettings:
    suite = values.get("suite")
    if suite not in EVAL_SUITES:
        raise ConfigError(f"eval.suite={suite!r}; choose one of {', '.join(EVAL_SUITES)}")
    tasks = values.get("tasks")
    if suite == "lm_eval" and not tasks:
        raise ConfigError("eval.suite=lm_eval needs a list of lm-eval task names in eval.tasks")
    # Checked here, not when evaluation starts: a typo must not cost a calibration first.
    ppl_datasets = tuple(values.get("ppl_datasets") or ())
    unknown = [name for name in ppl_datasets if name not in PPL_DATASETS]
    if unknown:
        raise ConfigError(f"eval.ppl_datasets: unknown {unknown}; choose from {', '.join(PPL_DATASETS)}")
    return EvalSettings(
        suite=suite,
        tasks=None if tasks is None else tuple(tasks),
        ppl_datasets=ppl_datasets,
        max_seq_len=int(values.get("max_seq_len", 2048)),
        batch_size=values.get("batch_size", 8),
        max_ppl_tokens=values.get("max_ppl_tokens"),
        limit=values.get("limit"),
        num_fewshot=int(values.get("num_fewshot", 0)),
    )


def build_logger_settings(values: dict[str, Any]) -> LoggerSettings:
    backend, mode = values.get("backend"), values.get("mode", "auto")
    if backend not in LOGGER_BACKENDS:
        raise ConfigError(f"logger.backend={backend!r}; choose one of {', '.join(LOGGER_BACKENDS)}")
    if mode not in WANDB_MODES:
        raise ConfigError(f"logger.mode={mode!r}; choose one of {', '.join(WANDB_MODES)}")
    return LoggerSettings(
        backend=backend,
        mode="disabled" if backend == "none" else mode,
        project=str(values.get("project", "latmix")),
        entity=values.get("entity"),
        group=values.get("group"),
        tags=tuple(values.get("tags") or ()),
        log_figures=bool(values.get("log_figures", True)),
    )


def build_experiment(cfg: DictConfig) -> Experiment:
    """Turn a composed Hydra config into typed settings; ConfigError on the first bad value."""
    quant_values = _section(cfg, "quant")
    transform_values = _section(cfg, "transform")
    quant_name = str(quant_values.get("name", "custom"))
    transform_name = str(transform_values.get("name", "custom"))
    quant = build_quant_config(quant_values)
    calib = build_dataclass(CalibConfig, _section(cfg, "calib"), "calib")
    if calib.objective == "bound" and calib.mode != "none" and quant.act_format is None:
        raise ConfigError(
            "calib.objective=bound measures activation quantization error, but quant.act_format is null; "
            "quantize activations (e.g. quant=mxfp4) or use objective kl / block_mse"
        )
    return Experiment(
        model=build_model_settings(_section(cfg, "model")),
        quant_name=quant_name,
        quant=quant,
        transform_name=transform_name,
        transform=build_transform_config(transform_values, kv_quantized=quant.kv_format is not None),
        calib=calib,
        optim=build_dataclass(OptimConfig, _section(cfg, "optim"), "optim"),
        eval=build_eval_settings(_section(cfg, "eval")),
        logger=build_logger_settings(_section(cfg, "logger")),
        seed=int(cfg.get("seed", 0)),
        device=resolve_device(str(cfg.get("device", "auto"))),
        force=bool(cfg.get("force", False)),
        results_dir=Path(str(cfg.paths.results_dir)).expanduser().resolve(),
    )


def quantized_dims(model_config: Any) -> dict[str, int]:
    """The reduction dimensions the MX blocks run along: every linear's input size."""
    heads = model_config.num_attention_heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
    return {
        "hidden_size": model_config.hidden_size,
        "intermediate_size": model_config.intermediate_size,
        "num_attention_heads * head_dim": heads * head_dim,
    }


def check_model_dimensions(exp: Experiment, model_config: Any) -> None:
    """Every quantized input dimension must split into whole MX blocks (checked before loading weights)."""
    for side, fmt in (("weight", exp.quant.weight_format), ("act", exp.quant.act_format)):
        block = exp.quant.block_for(fmt)
        for dim_name, dim in quantized_dims(model_config).items():
            if block is not None and dim % block:
                raise ConfigError(
                    f"quant.block_size: the {side} block size {block} does not divide the model's "
                    f"{dim_name}={dim}; choose a block size that divides {dim}"
                )
