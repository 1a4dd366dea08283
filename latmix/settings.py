"""The typed settings of every stage, and the tables of names they are checked against.

Pure Python: nothing here imports torch or transformers, so `run.py` rejects a bad config within a
second, before the pipeline is imported. Each dataclass checks its own fields when it is built and
says what to change (a ValueError; `from_values` reports it as a ConfigError naming the config key).
`latmix.config` builds every one of them from the Hydra config the same way (`from_values`); the
modules of the pipeline take them as they are. What needs torch (is there a CUDA device?) or the
model (do the block sizes divide its dimensions?) is checked later, when that is known, by the same
classes where it can be (`QuantConfig.check_dimensions`).

The name tables below are the single source of the choices: the modules that implement a choice
import its table from here (a test asserts that TRANSFORM_FAMILIES equals what the transform classes
accept).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_type_hints

from latmix.errors import ConfigError
from latmix.formats import get_format

# --- the tables of names ---------------------------------------------------------------------------

# model
MODEL_DTYPES = ("float32", "float16", "bfloat16")
# The config.json model_types latmix has an adapter for (latmix.models.adapter.ADAPTERS, the same keys).
MODEL_TYPES = ("llama", "mistral", "qwen2")
# Where outliers can be planted (latmix.models.outliers says how).
OUTLIER_POINTS = ("norm", "mlp", "attn_vo")
OUTLIER_KEYS = ("n_channels", "scale", "seed", "points")
# torch's device types (`device=<type>` or `<type>:<index>`); "auto" = CUDA when there is one, else CPU.
DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu", "hpu", "mtia", "xla", "ipu", "hip", "meta")

# quant: the seven linears of a decoder block, in the order data reaches them.
LINEAR_ROLES = ("q", "k", "v", "o", "gate", "up", "down")
WEIGHT_QUANTIZERS = ("rtn", "gptq")

# transform
PLACEMENTS = ("residual", "pre_linear", "attn_vo", "o_proj", "down_proj", "qk")
# family -> the keyword arguments its class takes besides dim (what a placement spec may set).
TRANSFORM_FAMILIES: dict[str, frozenset[str]] = {
    "identity": frozenset(),
    "hadamard": frozenset({"seed"}),
    "block_hadamard": frozenset({"block_size"}),
    "rotation": frozenset({"learnable", "init", "seed", "block_size", "parametrization"}),
    "affine": frozenset(
        {"parametrization", "init", "shift", "learnable", "learn", "seed", "block_size", "factor", "kron_factors",
         "premix", "channel_scales"}
    ),
}
ORTHOGONAL_FAMILIES = ("identity", "hadamard", "block_hadamard", "rotation")
# The named values of those kwargs: where a learnable map starts, how an affine map is parametrized
# (a block_diag or kronecker map's blocks or factors are each one of FACTOR_PARAMETRIZATIONS).
INITS = ("identity", "hadamard", "block_hadamard", "random")
AFFINE_PARAMETRIZATIONS = ("qr", "lu", "svd", "kronecker", "block_diag")
FACTOR_PARAMETRIZATIONS = ("qr", "lu", "svd")
# How a learned rotation is held: exp (orthogonal under any optimizer) or stiefel (the matrix itself, which
# only optim=cayley_sgd keeps orthogonal: SpinQuant).
ROTATION_PARAMETRIZATIONS = ("exp", "stiefel")
# A fixed map an affine map applies first (A = B H): "hadamard" (a randomized full Hadamard), or null.
PREMIXES = ("hadamard",)
# What of a learnable affine map is learned: every parameter, or its per-channel scales alone.
LEARNED_PARTS = ("all", "scales")

# calib
MODES = ("end_to_end", "layer_wise", "none")
# What a block learns from in layer_wise mode: the stream through the earlier blocks as quantized and
# learned, or the full-precision model's own stream (FlatQuant).
LAYER_INPUTS = ("quantized", "full_precision")
OBJECTIVES = ("kl", "ce", "block_mse", "bound")
# How the quantizers round while the transforms are learned (latmix.mx): exactly, with a
# straight-through gradient, or by adding noise as wide as the rounding step (a loss without rounding flips).
ROUNDINGS = ("nearest", "noise")
SOURCES = ("local", "wikitext2", "c4")
AUTOCAST_DTYPES = ("bfloat16", "float16")

# optim
OPTIMIZERS = ("adamw", "sgd", "cayley_sgd")
MOMENTUM_OPTIMIZERS = ("sgd", "cayley_sgd")
SCHEDULES = ("cosine", "constant")

# eval
EVAL_SUITES = ("local", "lm_eval")
LOCAL_PPL_DATASETS = ("heldout", "ood")
PPL_DATASETS = ("wikitext2", *LOCAL_PPL_DATASETS)

# logger: "auto" = online with W&B credentials, offline without; "disabled" = no tracker.
LOGGER_MODES = ("auto", "online", "offline", "disabled")


# Seeds reach Python, NumPy (which takes 0 <= seed < 2**32) and torch.
SEED_MAX = 2**32 - 1


def check_seed(name: str, value: Any) -> None:
    """ValueError naming the key unless value is an integer seed NumPy and torch both accept."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= SEED_MAX:
        raise ValueError(f"{name}={value!r} is not a seed; use an integer from 0 to {SEED_MAX}")


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    """ValueError naming the key, the value and the choices, unless value is one of them."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not supported; choose one of {', '.join(map(str, choices))}")


def from_values(cls: type, values: Mapping[str, Any], where: str) -> Any:
    """cls(**values), with unknown keys and rejected values reported as a ConfigError about `where`."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}; {cls.__name__} takes {', '.join(sorted(names))}"
        )
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from err


def _set(obj: Any, name: str, value: Any) -> None:
    """Normalize a field of a frozen dataclass in its __post_init__."""
    object.__setattr__(obj, name, value)


# --- model ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSettings:
    """Which checkpoint, in which dtype; `outliers` plants outlier channels (a synthetic stress test).

    The checkpoint is name_or_path (a local directory or a hub id) or cache (an entry of
    latmix.models.cache, resolved to its directory when the model loads): exactly one of the two.
    """

    name: str
    name_or_path: str | None = None
    dtype: str = "float32"
    trust_remote_code: bool = False
    outliers: dict[str, Any] | None = None
    cache: str | None = None

    def __post_init__(self) -> None:
        if (self.name_or_path is None) == (self.cache is None):
            raise ValueError(
                "set exactly one of model.name_or_path (a directory or hub id) and model.cache (a cached "
                "model, as model=smollm2-135m has); to load a directory with this preset add model.cache=null, "
                "or pick a preset without a cache (model=llama3.2-1b model.name_or_path=DIR)"
            )
        check_choice("model.dtype", self.dtype, MODEL_DTYPES)
        if self.outliers is not None:
            keys = set(self.outliers)
            if not {"n_channels", "scale", "seed"} <= keys or not keys <= set(OUTLIER_KEYS):
                raise ValueError("model.outliers needs n_channels, scale and seed (and optionally points), or null")
            points = self.outliers.get("points", ("norm",))
            points = (points,) if isinstance(points, str) else tuple(points)
            unknown = [p for p in points if p not in OUTLIER_POINTS]
            if unknown or not points:
                raise ValueError(f"model.outliers.points: unknown {unknown}; choose from {', '.join(OUTLIER_POINTS)}")


# --- quant ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantConfig:
    """MX formats per side (None = high precision), block size (None = format default), which linears.

    layers: "decoder" (all seven linears of every block) or a list of roles from LINEAR_ROLES.
    weight_quantizer "gptq" leaves weights unquantized until latmix.gptq writes them (with the
    GPTQSettings of the run). kv_format quantizes K (after RoPE) and V per head along head_dim.
    """

    weight_format: str | None = None
    act_format: str | None = None
    block_size: int | None = None
    weight_quantizer: str = "rtn"
    kv_format: str | None = None
    layers: str | Sequence[str] = "decoder"

    def __post_init__(self) -> None:
        for fmt in (self.weight_format, self.act_format, self.kv_format):
            if fmt is not None:
                get_format(fmt)
        if self.weight_quantizer not in WEIGHT_QUANTIZERS:
            raise ValueError(f"unknown weight_quantizer {self.weight_quantizer!r}; choose from {WEIGHT_QUANTIZERS}")
        if self.block_size is not None and self.block_size < 1:
            raise ValueError(f"block_size must be a positive integer or None, got {self.block_size}")
        if isinstance(self.layers, str):
            if self.layers != "decoder":
                raise ValueError(f"layers must be 'decoder' or a list of roles from {LINEAR_ROLES}, got {self.layers!r}")
        else:
            _set(self, "layers", list(self.layers))
            unknown = set(self.layers) - set(LINEAR_ROLES)
            if unknown:
                raise ValueError(f"unknown layer roles {sorted(unknown)}; choose from {LINEAR_ROLES}")

    @property
    def quantized_roles(self) -> tuple[str, ...]:
        return LINEAR_ROLES if self.layers == "decoder" else tuple(self.layers)

    def block_for(self, fmt: str | None) -> int | None:
        """The block size a side quantizes with (None: that side stays in high precision)."""
        if fmt is None:
            return None
        return self.block_size or get_format(fmt).default_block_size

    def check_dimensions(self, input_dims: Mapping[str, tuple[str, int]], head_dim: int) -> None:
        """Every quantized input must split into whole MX blocks: ConfigError naming the dimension if not.

        input_dims: role -> (the model's name for that dimension, its size), as latmix.models gives it
        from the model config (before the weights load) or from the model.
        """
        for role in self.quantized_roles:
            what, dim = input_dims[role]
            for side, fmt in (("weight", self.weight_format), ("act", self.act_format)):
                block = self.block_for(fmt)
                if block is not None and dim % block:
                    raise ConfigError(
                        f"quant.block_size: the {side} block size {block} does not divide the model's "
                        f"{what}={dim}, the input dim of layer role {role!r}; choose a block size that "
                        f"divides {dim} or drop {role!r} from quant.layers"
                    )
        kv_block = self.block_for(self.kv_format)
        if kv_block is not None and head_dim % kv_block:
            raise ConfigError(
                f"quant.block_size: the kv block size {kv_block} does not divide the model's head_dim={head_dim}; "
                "choose a block size that divides it or set quant.kv_format=null"
            )


# --- gptq -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GPTQSettings:
    """GPTQ (the Hydra group gptq/, used when quant.weight_quantizer=gptq).

    damp: added to the Hessian's diagonal, as a fraction of its mean (GPTQ's 0.01). act_order: visit
    the MX blocks, and the columns within each, in order of decreasing Hessian mass.
    """

    damp: float = 0.01
    act_order: bool = False

    def __post_init__(self) -> None:
        if not self.damp > 0:
            raise ValueError(f"gptq.damp must be positive, got {self.damp}")


# --- transform --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TransformConfig:
    """placements: placement -> {family: ..., family kwargs} or None (off).

        residual    T1 on the residual stream, folded into every reader and writer
        pre_linear  online after each RMSNorm: one map shared by q/k/v, one by gate/up
        attn_vo     T2 per head between v and o
        o_proj      online before o_proj across the heads (a num_heads map; FlatQuant's o_trans)
        down_proj   online before down_proj
        qk          online on q and k after RoPE (orthogonal families only), for a quantized KV cache

    A non-orthogonal family at residual changes the full-precision function (RMSNorm commutes only
    with orthogonal maps); it is allowed with approximate: true, and the deviation is then measured.

    fold_norms: with pre-linear maps, move each RMSNorm weight into the linears that read it first, so
    the maps act on the bare normalized stream (true, the usual pipeline); false keeps the weights in
    the norms and the maps act on the norm's output with its weight. Both are exact. With false, a
    channel the model multiplies by a norm weight near 0 (SmolLM2's massive channels) stays out of the
    quantized operand (docs/calibration.md). A residual map needs the weights folded.
    """

    placements: dict[str, dict | None] = field(default_factory=dict)
    approximate: bool = False
    seed: int = 0
    fold_norms: bool = True

    def __post_init__(self) -> None:
        check_seed("transform.seed", self.seed)
        _set(self, "placements", {name: _validated_spec(name, spec) for name, spec in dict(self.placements).items()})
        residual = self.placements.get("residual")
        if not isinstance(self.fold_norms, bool):
            raise ValueError(f"transform.fold_norms must be true or false, got {self.fold_norms!r}")
        if residual is not None and not self.fold_norms:
            raise ValueError(
                "transform.fold_norms=false keeps the RMSNorm weights in the norms, but placement residual needs "
                "them folded into the readers (T1 acts on the bare normalized stream); set transform.fold_norms=true "
                "or drop placement residual"
            )
        if residual is not None and residual["family"] not in ORTHOGONAL_FAMILIES and not self.approximate:
            raise ValueError(
                f"placement residual with non-orthogonal family {residual['family']!r} does not preserve the "
                "model's function (RMSNorm commutes only with orthogonal maps); use an orthogonal family or set "
                "approximate: true to accept and measure the full-precision deviation"
            )

    def active(self) -> dict[str, dict]:
        return {name: spec for name, spec in self.placements.items() if spec is not None}


def _validated_spec(placement: str, spec: Mapping | None) -> dict | None:
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown placement {placement!r}; choose from {PLACEMENTS}")
    if spec is None:
        return None
    spec = dict(spec)
    family = spec.get("family")
    if family not in TRANSFORM_FAMILIES:
        raise ValueError(
            f"placement {placement}: unknown family {family!r}; choose one of {sorted(TRANSFORM_FAMILIES)}"
        )
    accepted = TRANSFORM_FAMILIES[family]
    unknown = set(spec) - {"family"} - accepted
    if unknown:
        raise ValueError(
            f"placement {placement}: family {family} does not take {sorted(unknown)}; it accepts {sorted(accepted)}"
        )
    parametrizations = ROTATION_PARAMETRIZATIONS if family == "rotation" else AFFINE_PARAMETRIZATIONS
    for key, choices in (("init", INITS), ("parametrization", parametrizations),
                         ("factor", FACTOR_PARAMETRIZATIONS), ("learn", LEARNED_PARTS)):
        if key in spec:
            check_choice(f"placement {placement}: {key}", spec[key], choices)
    if spec.get("premix") is not None:  # null: no premix
        check_choice(f"placement {placement}: premix", spec["premix"], PREMIXES)
    if "kron_factors" in spec and spec["kron_factors"] is not None:
        spec["kron_factors"] = tuple(spec["kron_factors"])
    if placement == "residual" and spec.get("shift"):
        raise ValueError("placement residual takes no shift (it would pass through RMSNorm); set shift: false")
    if placement == "qk" and family not in ORTHOGONAL_FAMILIES:
        raise ValueError(f"placement qk needs an orthogonal family {ORTHOGONAL_FAMILIES}, got {family!r}")
    return spec


# --- calib ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CalibConfig:
    """The calibration settings (the Hydra group calib/); the defaults are the project's reading of LATMiX."""

    mode: str = "end_to_end"
    objective: str = "kl"
    epochs: int = 2
    steps: int | None = None
    batch_size: int = 4
    # Sequences per forward/backward within a step (null: the whole batch at once). Gradients are summed
    # over the micro-batches, each loss weighted by its share of the batch: for the KL (a mean over
    # tokens) the step is the whole batch's; block_mse and bound normalize per micro-batch. Less memory,
    # the same compute: how a batch larger than memory allows is learned on.
    micro_batch_size: int | None = None
    n_samples: int = 128
    seq_len: int = 2048
    source: str = "wikitext2"
    reg_weight: float = 1e-2
    learn_clipping: bool = False
    cond_limit: float = 1e4
    checkpoint_every: int = 50
    seed: int = 0
    grad_checkpointing: bool = True
    autocast_dtype: str | None = "bfloat16"
    offload: bool = False
    # Per-layer bound/error and KL before and after learning (false skips them, e.g. for quick sweeps).
    measure: bool = True
    # While the weights are unquantized (GPTQ after), cheap structured maps act on the activations
    # instead of being folded into the weights every step: the same function, a cheaper backward.
    online_maps: bool = True
    # Fake-quantize the weights by round to nearest while learning, also when GPTQ quantizes them after.
    quantize_weights: bool = False
    # The text calibrated on with source=local (a file; null: the shipped calibration text).
    path: str | None = None
    # A checkpoint also every this many minutes (null: only every checkpoint_every steps); how a run is
    # kept, not what it computes: outside the run id and the checkpoint fingerprint.
    checkpoint_minutes: float | None = 5.0
    # Keep the checkpoints once the record is written (default: removed, they have served).
    keep_checkpoints: bool = False
    # SmoothQuant-style data-driven start for the per-channel scales of the learnable affine maps
    # (latmix.calibrate.smooth): s_j = max|x_j|^a / max|W_:,j|^(1-a), centered so log|det A| stays 0,
    # applied before learning (also with mode none). 0: off; 0 <= a < 1.
    smooth_alpha: float = 0.0
    # While learning, the quantizers round to nearest (the deployed MX, straight-through gradient) or add
    # noise as wide as their rounding step (mx.with_rounding_noise). Measurements, GPTQ and evaluation
    # always round to nearest.
    rounding: str = "nearest"
    # layer_wise only: each block learns on the quantized stream through the earlier, already learned
    # blocks, or on the full-precision model's stream, as FlatQuant does (full_precision).
    layer_inputs: str = "quantized"

    def __post_init__(self) -> None:
        check_choice("calib.mode", self.mode, MODES)
        check_choice("calib.layer_inputs", self.layer_inputs, LAYER_INPUTS)
        check_choice("calib.objective", self.objective, OBJECTIVES)
        check_choice("calib.rounding", self.rounding, ROUNDINGS)
        check_choice("calib.source", self.source, SOURCES)
        if self.autocast_dtype is not None:
            check_choice("calib.autocast_dtype", self.autocast_dtype, AUTOCAST_DTYPES)
        for name in ("epochs", "batch_size", "n_samples", "seq_len", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"calib.{name} must be >= 1, got {getattr(self, name)}")
        if self.micro_batch_size is not None and not 1 <= self.micro_batch_size <= self.batch_size:
            raise ValueError(
                f"calib.micro_batch_size={self.micro_batch_size} must be between 1 and calib.batch_size="
                f"{self.batch_size}, or null (the whole batch at once)"
            )
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"calib.steps must be >= 1 or null (no cap), got {self.steps}")
        check_seed("calib.seed", self.seed)
        if self.checkpoint_minutes is not None and not self.checkpoint_minutes > 0:
            raise ValueError(
                f"calib.checkpoint_minutes must be > 0 or null (step-based only), got {self.checkpoint_minutes}"
            )
        if self.path is not None and self.source != "local":
            raise ValueError(
                f"calib.path is the text of calib.source=local, but calib.source={self.source}; "
                "set calib.source=local or calib.path=null"
            )
        if self.reg_weight < 0:
            raise ValueError(f"calib.reg_weight must be >= 0, got {self.reg_weight}")
        if isinstance(self.smooth_alpha, bool) or not isinstance(self.smooth_alpha, (int, float)) or not (
            0 <= self.smooth_alpha < 1
        ):
            raise ValueError(
                f"calib.smooth_alpha={self.smooth_alpha!r} is not a smoothing strength; use a number with "
                "0 <= alpha < 1 (0 = off, 0.5 = SmoothQuant's balance)"
            )
        if not self.cond_limit > 1:
            raise ValueError(f"calib.cond_limit must be > 1 (a condition number), got {self.cond_limit}")
        if self.mode == "end_to_end" and self.objective == "block_mse":
            raise ValueError(
                "objective block_mse is the layer_wise loss; use mode=layer_wise or objective kl/ce/bound"
            )
        if self.offload and self.mode == "end_to_end":
            raise ValueError(
                "calib.offload keeps one block on the GPU, but end_to_end backpropagates through every block "
                "at once; use mode=layer_wise (or none) with offload, or offload: false"
            )
        if self.mode == "end_to_end" and self.layer_inputs != "quantized":
            raise ValueError(
                f"calib.layer_inputs={self.layer_inputs} is what a block learns on in mode=layer_wise; "
                "end_to_end learns on the whole model; use mode=layer_wise or layer_inputs=quantized"
            )
        if self.mode == "layer_wise" and self.objective in ("kl", "ce"):
            raise ValueError(
                f"objective {self.objective} needs the whole model; use mode=end_to_end or objective block_mse/bound"
            )


# --- optim ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OptimConfig:
    """The optimizer of calibration (the Hydra group optim/).

    momentum is a key of the momentum optimizers (sgd, cayley_sgd; 0.9 when not given) and must stay
    unset for adamw, which has none.
    """

    name: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float | None = None
    schedule: str = "cosine"
    warmup: int = 0
    grad_clip: float | None = 1.0
    # The learned clipping logits' own learning rate (calib.learn_clipping); None: lr. They start
    # saturated (sigmoid(4) = 0.982), so at an lr chosen for the maps a few steps hardly move them.
    clip_lr: float | None = None

    def __post_init__(self) -> None:
        check_choice("optim.name", self.name, OPTIMIZERS)
        check_choice("optim.schedule", self.schedule, SCHEDULES)
        if not self.lr > 0:
            raise ValueError(f"optim.lr must be positive, got {self.lr}")
        if self.clip_lr is not None and not self.clip_lr > 0:
            raise ValueError(f"optim.clip_lr must be positive or null (optim.lr), got {self.clip_lr}")
        if self.name in MOMENTUM_OPTIMIZERS:
            if self.momentum is None:
                _set(self, "momentum", 0.9)
        elif self.momentum is not None:
            raise ValueError(
                f"optim.momentum is not used by {self.name}; remove it (it is a key of {', '.join(MOMENTUM_OPTIMIZERS)})"
            )
        if self.weight_decay < 0 or not 0 <= (self.momentum or 0.0) < 1:
            raise ValueError(
                f"need optim.weight_decay >= 0 and 0 <= optim.momentum < 1, got {self.weight_decay}, {self.momentum}"
            )
        if self.warmup < 0:
            raise ValueError(f"optim.warmup must be >= 0 steps, got {self.warmup}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"optim.grad_clip must be positive or null (off), got {self.grad_clip}")


# --- eval -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalSettings:
    """Perplexity datasets and zero-shot tasks (the Hydra group eval/)."""

    suite: str  # "local": the embedded task directory; "lm_eval": lm-eval's own task registry
    tasks: tuple[str, ...] | None  # None: every task of the local suite
    ppl_datasets: tuple[str, ...]
    max_seq_len: int = 2048
    batch_size: int | str = 8
    max_ppl_tokens: int | None = None  # evaluate perplexity on the first this-many tokens (None = all)
    limit: int | None = None
    num_fewshot: int = 0

    def __post_init__(self) -> None:
        check_choice("eval.suite", self.suite, EVAL_SUITES)
        if self.suite == "lm_eval" and not self.tasks:
            raise ValueError("eval.suite=lm_eval needs a list of lm-eval task names in eval.tasks")
        _set(self, "tasks", None if self.tasks is None else tuple(self.tasks))
        _set(self, "ppl_datasets", tuple(self.ppl_datasets or ()))
        # Checked here: a bad count would otherwise fail only after calibration and GPTQ.
        for name, low, allow_none in (
            ("limit", 1, True), ("max_ppl_tokens", 1, True), ("max_seq_len", 1, False), ("num_fewshot", 0, False)
        ):
            value = getattr(self, name)
            if (value is None and not allow_none) or (value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < low
            )):
                null = " or null (all)" if allow_none else ""
                raise ValueError(f"eval.{name} must be an integer >= {low}{null}, got {value!r}")
        # Checked here, not when evaluation starts: a typo or a missing file must not cost a calibration first.
        _set(self, "ppl_datasets", tuple(_ppl_dataset(str(entry)) for entry in self.ppl_datasets))
        names = [ppl_dataset_name(entry) for entry in self.ppl_datasets]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(
                f"eval.ppl_datasets: more than one entry would be recorded as {', '.join(repeated)} "
                "(a text file is recorded by its name without the suffix); rename or drop one"
            )


def ppl_dataset_name(entry: str) -> str:
    """The name a perplexity dataset is recorded under: a dataset's name, or a text file's stem."""
    return entry if entry in PPL_DATASETS else Path(entry).stem


def _ppl_dataset(entry: str) -> str:
    """A dataset name as it is, or a readable, non-empty UTF-8 text file as its absolute path."""
    if entry in PPL_DATASETS:
        return entry
    path = Path(entry).expanduser()
    if not path.is_file():
        raise ValueError(
            f"eval.ppl_datasets: unknown {entry!r}: neither a dataset ({', '.join(PPL_DATASETS)}) "
            "nor an existing text file"
        )
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as err:
        raise ValueError(f"eval.ppl_datasets: cannot read {path} ({err.strerror or err})") from err
    except UnicodeDecodeError as err:
        raise ValueError(f"eval.ppl_datasets: {path} is not UTF-8 text (byte {err.start} of it)") from err
    if not text.strip():
        raise ValueError(f"eval.ppl_datasets: {path} has no text")
    return str(path.resolve())


# --- logger -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoggerSettings:
    """The W&B tracker (the Hydra group logger/); mode disabled turns it off."""

    mode: str = "auto"
    project: str = "latmix"
    entity: str | None = None
    group: str | None = None  # None: the run's configuration (tracking.run_identity)
    tags: tuple[str, ...] = ()
    log_figures: bool = True

    def __post_init__(self) -> None:
        check_choice("logger.mode", self.mode, LOGGER_MODES)
        _set(self, "tags", tuple(self.tags or ()))


# --- the experiment ---------------------------------------------------------------------------------

_DEVICE = re.compile(rf"^(auto|({'|'.join(DEVICE_TYPES)})(:\d+)?)$")


@dataclass(frozen=True)
class Experiment:
    """Everything one run needs, typed and validated. `device` is a name ("auto" resolved when torch runs)."""

    model: ModelSettings
    quant_name: str
    quant: QuantConfig
    transform_name: str
    transform: TransformConfig
    calib: CalibConfig
    optim: OptimConfig
    gptq: GPTQSettings
    eval: EvalSettings
    logger: LoggerSettings
    seed: int
    device: str
    force: bool
    results_dir: Path
    # Another process running the same run: false = stop at once with a line saying where; true = wait.
    wait: bool = False
    # Write the quantized model to <results_dir>/export/<run_id>/ (latmix.export; docs/harness.md).
    export: bool = False

    def __post_init__(self) -> None:
        try:
            check_seed("seed", self.seed)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if not _DEVICE.match(self.device):
            raise ConfigError(f"device={self.device!r} is not a torch device; use auto, cpu, cuda or cuda:N")
        stiefel = [name for name, spec in self.transform.active().items() if spec.get("learnable")
                   and spec["family"] == "rotation" and spec.get("parametrization") == "stiefel"]
        if stiefel and self.calib.mode != "none" and self.optim.name != "cayley_sgd":
            raise ConfigError(
                f"placement {stiefel[0]} learns its rotation matrix itself (parametrization: stiefel), which only "
                f"Cayley SGD keeps orthogonal, but optim={self.optim.name}; add optim=cayley_sgd (transform=spinquant "
                "does) or set parametrization: exp"
            )
        if self.calib.objective == "bound" and self.calib.mode != "none" and self.quant.act_format is None:
            raise ConfigError(
                "calib.objective=bound measures activation quantization error, but quant.act_format is null; "
                "quantize activations (e.g. quant=mxfp4) or use objective kl / block_mse"
            )


# --- the config sections ----------------------------------------------------------------------------

# The Hydra config group each settings class is built from (latmix.config.build_experiment).
SECTION_SETTINGS: dict[str, type] = {
    "model": ModelSettings,
    "quant": QuantConfig,
    "gptq": GPTQSettings,
    "transform": TransformConfig,
    "calib": CalibConfig,
    "optim": OptimConfig,
    "eval": EvalSettings,
    "logger": LoggerSettings,
}


@functools.cache
def float_keys() -> dict[str, frozenset[str]]:
    """section -> its keys typed float (or float | None): where `reg_weight=0` and `reg_weight: 0.0`
    mean the same number, however YAML or the command line spelled it. Cached: the classes do not
    change, and every run id and every tabulated record asks (resolving the hints takes 1.6 ms)."""
    keys = {}
    for section, cls in SECTION_SETTINGS.items():
        hints = get_type_hints(cls)
        keys[section] = frozenset(name for name, hint in hints.items() if hint is float or float in get_args(hint))
    return keys
