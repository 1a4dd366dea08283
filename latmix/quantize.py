"""Model surgery: transforms placed and folded, linears MX-quantized, from a transform and a quant config.

prepare_model(model, transform_cfg, quant_cfg) returns the same model object, transformed and
quantized, still called as model(input_ids). Placements (DESIGN.md):

    residual    T1 on the residual stream: embedding output, folded into every reader (q/k/v, gate/up,
                lm_head) and every writer (o, down) after RMSNorm weights are folded into the readers
    pre_linear  online after each RMSNorm: one map shared by q/k/v, one by gate/up
    attn_vo     T2 per head: v_proj out-map, inverse folded into o_proj (a shift becomes an o_proj bias)
    down_proj   online before down_proj
    qk          online on q and k after RoPE (orthogonal families only), for a quantized KV cache
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface
from transformers.models.llama.modeling_llama import eager_attention_forward

from latmix import mx
from latmix.fidelity import logit_deviation
from latmix.models import LINEAR_ROLES, LlamaFamilyAdapter, get_adapter
from latmix.offload import resident
from latmix.transforms import (
    TRANSFORMS,
    Headwise,
    Transform,
    build_transform,
    cached_transforms,
    transform_kwargs,
)

__all__ = [
    "PLACEMENTS",
    "QuantConfig",
    "QuantLinear",
    "TransformConfig",
    "TransformedEmbedding",
    "fp_deviation",
    "freeze_model",
    "prepare_model",
    "quantization_disabled",
    "set_quantization",
    "transforms_of",
]

PLACEMENTS = ("residual", "pre_linear", "attn_vo", "down_proj", "qk")
_ONLINE_PLACEMENTS = ("pre_linear", "down_proj", "qk")
_ORTHOGONAL_FAMILIES = ("identity", "hadamard", "block_hadamard", "rotation")
WEIGHT_QUANTIZERS = ("rtn", "gptq")


# --- configs -------------------------------------------------------------------------------------


@dataclass
class TransformConfig:
    """placements: placement -> {family: ..., family kwargs} or None (off). See the module docstring."""

    placements: dict[str, dict | None] = field(default_factory=dict)
    approximate: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        self.placements = {name: _validated_spec(name, spec) for name, spec in dict(self.placements).items()}
        residual = self.placements.get("residual")
        if residual is not None and residual["family"] not in _ORTHOGONAL_FAMILIES and not self.approximate:
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
    if family not in TRANSFORMS:
        raise ValueError(f"placement {placement}: unknown family {family!r}; choose one of {sorted(TRANSFORMS)}")
    unknown = set(spec) - {"family"} - transform_kwargs(family)
    if unknown:
        raise ValueError(
            f"placement {placement}: family {family} does not take {sorted(unknown)}; "
            f"it accepts {sorted(transform_kwargs(family))}"
        )
    if "kron_factors" in spec and spec["kron_factors"] is not None:
        spec["kron_factors"] = tuple(spec["kron_factors"])
    if placement == "residual" and spec.get("shift"):
        raise ValueError("placement residual takes no shift (it would pass through RMSNorm); set shift: false")
    if placement == "qk" and family not in _ORTHOGONAL_FAMILIES:
        raise ValueError(f"placement qk needs an orthogonal family {_ORTHOGONAL_FAMILIES}, got {family!r}")
    return spec


@dataclass
class QuantConfig:
    """MX formats per side (None = high precision), block size (None = format default), which linears.

    layers: "decoder" (all seven linears of every block) or a list of roles from LINEAR_ROLES.
    weight_quantizer "gptq" leaves weights unquantized until latmix.gptq writes them.
    kv_format quantizes K (after RoPE) and V per head along head_dim.
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
                mx.get_format(fmt)
        if self.weight_quantizer not in WEIGHT_QUANTIZERS:
            raise ValueError(f"unknown weight_quantizer {self.weight_quantizer!r}; choose from {WEIGHT_QUANTIZERS}")
        if self.block_size is not None and self.block_size < 1:
            raise ValueError(f"block_size must be a positive integer or None, got {self.block_size}")
        if isinstance(self.layers, str):
            if self.layers != "decoder":
                raise ValueError(f"layers must be 'decoder' or a list of roles from {LINEAR_ROLES}, got {self.layers!r}")
        else:
            self.layers = list(self.layers)
            unknown = set(self.layers) - set(LINEAR_ROLES)
            if unknown:
                raise ValueError(f"unknown layer roles {sorted(unknown)}; choose from {LINEAR_ROLES}")

    @property
    def quantized_roles(self) -> tuple[str, ...]:
        return LINEAR_ROLES if self.layers == "decoder" else tuple(self.layers)

    def block_for(self, fmt: str | None) -> int | None:
        if fmt is None:
            return None
        return self.block_size or mx.get_format(fmt).default_block_size


# --- quantized linear ----------------------------------------------------------------------------


class QuantLinear(nn.Module):
    """A linear that folds transforms into its weight and MX-quantizes weights and input activations.

    y = Q_a(online(x)) @ Q_w(W')^T + b', where W', b' fold `folded_in` and `online_in` (inverse maps of
    what was applied to x) and `out_map` (maps applied to the output). While not frozen, W', b' are
    recomputed every forward so gradients reach the transform parameters.
    """

    def __init__(
        self,
        linear: nn.Linear,
        *,
        folded_in: Sequence[Transform] = (),
        online_in: Sequence[Transform] = (),
        out_map: Sequence[Transform] = (),
        weight_format: str | None = None,
        act_format: str | None = None,
        weight_block_size: int | None = None,
        act_block_size: int | None = None,
    ) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.folded_in = nn.ModuleList(folded_in)
        self.online_in = nn.ModuleList(online_in)
        self.out_map = nn.ModuleList(out_map)
        self.weight_format = None if weight_format is None else mx.get_format(weight_format)
        self.act_format = None if act_format is None else mx.get_format(act_format)
        self.weight_block_size = weight_block_size
        self.act_block_size = act_block_size
        # FlatQuant-style learnable clipping; calibration assigns nn.Parameters here.
        self.register_parameter("weight_clip", None)
        self.register_parameter("act_clip", None)
        self._cached_weight: tuple[tuple, torch.Tensor] | None = None
        self.frozen = False
        self.weight_is_quantized = False
        self._quantize_weights = self.weight_format is not None
        self.quantize_acts = self.act_format is not None

    @property
    def quantize_weights(self) -> bool:
        return self._quantize_weights

    @quantize_weights.setter
    def quantize_weights(self, value: bool) -> None:
        if value and self.weight_format is None:
            raise ValueError("this layer has no weight_format; it cannot quantize its weights")
        self._quantize_weights = value
        self._cached_weight = None

    def effective_weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W', b') in float32 with every transform folded (the stored ones once frozen)."""
        weight = self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        if self.frozen:
            return weight, bias
        for transform in (*self.folded_in, *self.online_in):
            weight = transform.fold_into(weight)
            if transform.shift is not None:
                shift_term = weight @ transform.shift
                bias = -shift_term if bias is None else bias - shift_term
        for transform in self.out_map:
            weight = transform.apply_matrix(weight.T).T
            if bias is not None:
                bias = transform(bias)
            elif transform.shift is not None:
                bias = transform.shift
        return weight, bias

    def _forward_weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        # Once frozen and outside autograd the quantized weight never changes: compute it once.
        cacheable = self.frozen and not torch.is_grad_enabled()
        key = self._cache_key()
        if cacheable and self._cached_weight is not None and self._cached_weight[0] == key:
            return self._cached_weight[1], self.bias
        weight, bias = self.effective_weight_and_bias()
        if self.quantize_weights and not self.weight_is_quantized:
            weight = mx.quantize(weight, self.weight_format, self.weight_block_size, dim=-1, clip_ratio=self.weight_clip)
            if cacheable:
                self._cached_weight = (key, weight)
        return weight, bias

    def _cache_key(self) -> tuple:
        """Changes whenever the weight or the clip ratio is replaced, moved or updated in place."""
        clip = self.weight_clip
        clip_key = None if clip is None else (id(clip), clip._version)
        return id(self.weight), self.weight._version, self.weight.device, clip_key

    def transformed_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input after the online maps: the operand activation quantization sees (and the bound measures)."""
        for transform in self.online_in:
            x = transform(x)
        return x

    def gemm_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input as the matrix product receives it: online maps, then MX quantization when it is on."""
        x = self.transformed_input(x)
        if self.quantize_acts:
            x = mx.quantize(x, self.act_format, self.act_block_size, dim=-1, clip_ratio=self.act_clip)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.gemm_input(x)
        weight, bias = self._forward_weight_and_bias()
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @torch.no_grad()
    def freeze(self) -> None:
        """Fold every transform into the stored weight/bias once; keep (and stop training) the online ones."""
        if self.frozen:
            return
        weight, bias = self.effective_weight_and_bias()
        dtype = self.weight.dtype
        self.weight = nn.Parameter(weight.to(dtype), requires_grad=self.weight.requires_grad)
        if bias is not None:
            self.bias = nn.Parameter(bias.to(dtype), requires_grad=False)
        self.folded_in = nn.ModuleList()
        self.out_map = nn.ModuleList()
        self.online_in.requires_grad_(False)
        self.frozen = True
        self._cached_weight = None

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor) -> None:
        """Install an already-quantized weight (GPTQ): folds the transforms first, never re-quantizes it."""
        if weight.shape != self.weight.shape:
            raise ValueError(f"set_weight: expected shape {tuple(self.weight.shape)}, got {tuple(weight.shape)}")
        self.freeze()
        self.weight.copy_(weight.to(self.weight.dtype))
        self.weight_is_quantized = True
        self._cached_weight = None

    def extra_repr(self) -> str:
        w = self.weight_format.name if self.weight_format else None
        a = self.act_format.name if self.act_format else None
        return f"in={self.in_features}, out={self.out_features}, w={w}, a={a}, frozen={self.frozen}"


class TransformedEmbedding(nn.Module):
    """Embedding whose output goes through the residual transform (until frozen into its table)."""

    def __init__(self, embedding: nn.Embedding, transform: Transform) -> None:
        super().__init__()
        self.embedding = embedding
        self.transform = transform

    @property
    def weight(self) -> torch.Tensor:
        return self.embedding.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.transform(self.embedding(input_ids))

    @torch.no_grad()
    def folded(self) -> nn.Embedding:
        """A plain embedding whose rows are the transformed rows."""
        self.embedding.weight.copy_(self.transform(self.embedding.weight))
        return self.embedding


# --- quantized KV cache and the qk transform, through transformers' attention interface ----------------


def _latmix_attention(base: str) -> Callable:
    def attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
        qk = getattr(module, "latmix_qk", None)
        if qk is not None:
            # Orthogonal R on both: (q R^T)(k R^T)^T = q k^T, so scores are unchanged.
            query, key = qk(query), qk(key)
        if getattr(module, "latmix_quantize_kv", False):
            fmt, block = module.latmix_kv_format, module.latmix_kv_block_size
            key = mx.quantize(key, fmt, block, dim=-1)
            value = mx.quantize(value, fmt, block, dim=-1)
        base_attention = ALL_ATTENTION_FUNCTIONS.get_interface(base, eager_attention_forward)
        return base_attention(module, query, key, value, attention_mask, **kwargs)

    return attention


def _install_latmix_attention(model: nn.Module) -> None:
    base = model.config._attn_implementation or "eager"
    if base.startswith("latmix_"):
        return
    name = f"latmix_{base}"
    AttentionInterface.register(name, _latmix_attention(base))
    if base in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    model.config._attn_implementation = name


# --- the one call --------------------------------------------------------------------------------


class _TransformFactory:
    """Builds the transforms of each placement with a distinct, reproducible seed per instance."""

    def __init__(self, cfg: TransformConfig, device: torch.device) -> None:
        self.specs = cfg.active()
        self.seed = cfg.seed
        self.device = device
        self.built: dict[str, Transform] = {}

    def __call__(
        self, placement: str, name: str, dim: int, device: torch.device | None = None
    ) -> Transform | None:
        spec = self.specs.get(placement)
        if spec is None:
            return None
        kwargs = {k: v for k, v in spec.items() if k != "family"}
        kwargs["seed"] = kwargs.get("seed", self.seed) + zlib.crc32(name.encode()) % 100_003
        transform = build_transform(spec["family"], dim, **kwargs).to(device or self.device)
        self.built[name] = transform
        return transform


def _per_head(transform: Transform | None, num_heads: int) -> Transform | None:
    return None if transform is None else Headwise(transform, num_heads)


def _present(*transforms: Transform | None) -> list[Transform]:
    return [t for t in transforms if t is not None]


def _check_block_sizes(adapter: LlamaFamilyAdapter, quant_cfg: QuantConfig) -> None:
    layer = adapter.layers()[0]
    for role in quant_cfg.quantized_roles:
        in_features = adapter.linear(layer, role).in_features
        for side, fmt in (("weight", quant_cfg.weight_format), ("act", quant_cfg.act_format)):
            block = quant_cfg.block_for(fmt)
            if block is not None and in_features % block:
                raise ValueError(
                    f"{side} block size {block} does not divide the input dim {in_features} of layer role "
                    f"{role!r}; choose a block size that divides it or drop {role!r} from quant.layers"
                )
    kv_block = quant_cfg.block_for(quant_cfg.kv_format)
    if kv_block is not None and adapter.head_dim % kv_block:
        raise ValueError(f"kv block size {kv_block} does not divide head_dim {adapter.head_dim}")


@torch.no_grad()
def _logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids.to(next(model.parameters()).device)).logits.float()


def prepare_model(
    model: nn.Module,
    transform_cfg: TransformConfig,
    quant_cfg: QuantConfig,
    *,
    deviation_ids: torch.Tensor | None = None,
) -> nn.Module:
    """Transform and quantize `model` in place; returns it.

    deviation_ids (a few short sequences, e.g. (2, 128)): the original model's logits on them are kept
    (on the CPU) and the full-precision deviation of the transformed model is recorded as
    model.latmix_fp_deviation; fp_deviation(model) measures it again later (after calibration). This
    matters for a non-orthogonal residual transform (approximate: true); it is ~0 otherwise.
    If no transform has trainable parameters the model is frozen right away (transforms folded once).
    """
    if hasattr(model, "latmix_transforms"):
        raise ValueError("this model was already prepared by latmix; load a fresh copy")
    adapter = get_adapter(model)
    _check_block_sizes(adapter, quant_cfg)
    reference = None if deviation_ids is None else (deviation_ids.cpu(), _logits(model, deviation_ids).cpu())

    make = _TransformFactory(transform_cfg, adapter.embed_tokens.weight.device)
    residual = make("residual", "residual", adapter.hidden_size)
    # Transforms on the normalized stream act on n(h), with the RMSNorm weight moved into the readers
    # (required for residual; the usual pipeline for pre_linear). Plain RTN keeps the norms as they are.
    if residual is not None or "pre_linear" in transform_cfg.active():
        adapter.fold_norms()
    weight_block = quant_cfg.block_for(quant_cfg.weight_format)
    act_block = quant_cfg.block_for(quant_cfg.act_format)

    def wrap(layer, role, **transforms) -> None:
        quantized = role in quant_cfg.quantized_roles
        adapter.set_linear(
            layer,
            role,
            QuantLinear(
                adapter.linear(layer, role),
                weight_format=quant_cfg.weight_format if quantized else None,
                act_format=quant_cfg.act_format if quantized else None,
                weight_block_size=weight_block,
                act_block_size=act_block,
                **transforms,
            ),
        )

    for i, layer in enumerate(adapter.layers()):
        # A block's own maps live where the block does (in CPU storage when its model is offloaded).
        at = next(layer.parameters()).device
        pre_attn = make("pre_linear", f"layers.{i}.pre_linear_attn", adapter.hidden_size, at)
        pre_mlp = make("pre_linear", f"layers.{i}.pre_linear_mlp", adapter.hidden_size, at)
        vo = make("attn_vo", f"layers.{i}.attn_vo", adapter.head_dim, at)
        down = make("down_proj", f"layers.{i}.down_proj", adapter.intermediate_size, at)
        for role in ("q", "k"):
            wrap(layer, role, folded_in=_present(residual), online_in=_present(pre_attn))
        v_out = _present(_per_head(vo, adapter.num_kv_heads))
        wrap(layer, "v", folded_in=_present(residual), online_in=_present(pre_attn), out_map=v_out)
        wrap(layer, "o", folded_in=_present(_per_head(vo, adapter.num_heads)), out_map=_present(residual))
        for role in ("gate", "up"):
            wrap(layer, role, folded_in=_present(residual), online_in=_present(pre_mlp))
        wrap(layer, "down", online_in=_present(down), out_map=_present(residual))
        _attach_attention_extras(adapter.attention(layer), make("qk", f"layers.{i}.qk", adapter.head_dim, at), quant_cfg)

    if residual is not None:
        adapter.set_embed_tokens(TransformedEmbedding(adapter.embed_tokens, residual))
        adapter.set_lm_head(QuantLinear(adapter.lm_head, folded_in=[residual]))
    if "qk" in transform_cfg.active() or quant_cfg.kv_format is not None:
        _install_latmix_attention(model)
    if quant_cfg.weight_quantizer == "gptq":
        set_quantization(model, weights=False, acts=quant_cfg.act_format is not None)

    model.latmix_transforms = make.built
    model.latmix_adapter = adapter
    if any(p.requires_grad for t in make.built.values() for p in t.parameters()):
        _cache_transforms_per_forward(model)
    else:
        freeze_model(model)
    if reference is not None:
        model.latmix_reference = reference
        model.latmix_fp_deviation = fp_deviation(model)
    return model


def fp_deviation(model: nn.Module) -> dict[str, float]:
    """Deviation of the model, run in full precision, from the original on prepare_model's deviation_ids."""
    if getattr(model, "latmix_reference", None) is None:
        raise ValueError("no reference logits: pass deviation_ids to prepare_model")
    input_ids, ref_logits = model.latmix_reference
    with quantization_disabled(model):
        logits = _logits(model, input_ids).cpu()
    return logit_deviation(logits, ref_logits, input_ids)


def _cache_transforms_per_forward(model: nn.Module) -> None:
    """Each forward builds every learnable transform's matrices once, not once per linear folding it."""

    def enter(module, args):
        module.latmix_cache_context = cached_transforms()
        module.latmix_cache_context.__enter__()

    def leave(module, args, output):
        module.latmix_cache_context.__exit__(None, None, None)

    model.register_forward_pre_hook(enter)
    model.register_forward_hook(leave, always_call=True)


def _attach_attention_extras(attention: nn.Module, qk: Transform | None, quant_cfg: QuantConfig) -> None:
    attention.latmix_qk = qk
    attention.latmix_kv_format = quant_cfg.kv_format
    attention.latmix_kv_block_size = quant_cfg.block_for(quant_cfg.kv_format)
    attention.latmix_quantize_kv = quant_cfg.kv_format is not None


# --- model-wide switches -------------------------------------------------------------------------


def _quant_linears(model: nn.Module) -> Iterator[QuantLinear]:
    return (m for m in model.modules() if isinstance(m, QuantLinear))


def _kv_attentions(model: nn.Module) -> Iterator[nn.Module]:
    return (m for m in model.modules() if getattr(m, "latmix_kv_format", None) is not None)


def set_quantization(model: nn.Module, weights: bool, acts: bool) -> None:
    """Turn weight / activation (and KV-cache) quantization on or off wherever a format is configured."""
    for linear in _quant_linears(model):
        linear.quantize_weights = weights and linear.weight_format is not None
        linear.quantize_acts = acts and linear.act_format is not None
    for attention in _kv_attentions(model):
        attention.latmix_quantize_kv = acts


@contextlib.contextmanager
def quantization_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the model in full precision inside the block; the previous switches come back after."""
    linears = list(_quant_linears(model))
    attentions = list(_kv_attentions(model))
    saved = [(m.quantize_weights, m.quantize_acts) for m in linears]
    saved_kv = [m.latmix_quantize_kv for m in attentions]
    set_quantization(model, weights=False, acts=False)
    try:
        yield model
    finally:
        for m, (w, a) in zip(linears, saved, strict=True):
            m.quantize_weights, m.quantize_acts = w, a
        for m, kv in zip(attentions, saved_kv, strict=True):
            m.latmix_quantize_kv = kv


def transforms_of(model: nn.Module) -> dict[str, Transform]:
    """Every transform in the model by stable name ("residual", "layers.3.attn_vo", ...).

    Fixed families have no trainable parameters; after freeze_model only the online ones remain.
    """
    if not hasattr(model, "latmix_transforms"):
        raise ValueError("model has no latmix transforms; call prepare_model first")
    return dict(model.latmix_transforms)


def freeze_model(model: nn.Module) -> None:
    """Fold every transform into the weights once (end of calibration): only online transforms remain."""
    adapter = model.latmix_adapter
    for layer in adapter.layers():
        # An offloaded block comes to the device, where a shared map (T1) lives, to fold it.
        with resident(model, layer):
            for linear in _quant_linears(layer):
                linear.freeze()
    for linear in _quant_linears(model):  # the rest: lm_head
        linear.freeze()
    if isinstance(adapter.embed_tokens, TransformedEmbedding):
        adapter.set_embed_tokens(adapter.embed_tokens.folded())
    model.latmix_transforms = {
        name: t for name, t in model.latmix_transforms.items() if _placement_of(name) in _ONLINE_PLACEMENTS
    }


def _placement_of(name: str) -> str:
    last = name.rsplit(".", 1)[-1]
    return "pre_linear" if last.startswith("pre_linear") else last
