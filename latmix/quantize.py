"""Model surgery: transforms placed and folded, linears MX-quantized, from a transform and a quant config.

prepare_model(model, transform_cfg, quant_cfg) transforms and quantizes the model in place (it is
still called as model(input_ids)) and returns a PreparedModel: the handle through which the rest of
the pipeline reaches what latmix added (the transforms by name, the adapter, the offload state, the
original model's reference logits). Nothing else rides on the model but the modules latmix put in it:
QuantLinear for every linear, TransformedEmbedding, and per attention module one AttentionQuant
(models.attention says where). Placements (DESIGN.md):

    residual    T1 on the residual stream: embedding output, folded into every reader (q/k/v, gate/up,
                lm_head) and every writer (o, down) after RMSNorm weights are folded into the readers
    pre_linear  online after each RMSNorm: one map shared by q/k/v, one by gate/up; on the bare
                normalized stream (RMSNorm weights folded into the readers), or on the norm's output
                with its weight when transform.fold_norms is false
    attn_vo     T2 per head: v_proj out-map, inverse folded into o_proj (a shift becomes an o_proj bias)
    o_proj      online before o_proj, across the heads (one num_heads map at every head feature:
                FlatQuant's o_trans), after attn_vo's per-head map
    down_proj   online before down_proj
    qk          online on q and k after RoPE (orthogonal families only), for a quantized KV cache
"""

from __future__ import annotations

import contextlib
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from latmix import mx
from latmix.fidelity import Reference, deviation
from latmix.formats import get_format
from latmix.models import LlamaFamilyAdapter, attention, get_adapter, model_dimensions
from latmix.offload import BlockOffload, offload_of, resident
from latmix.settings import QuantConfig, TransformConfig
from latmix.transforms import AcrossHeads, Headwise, Transform, build_transform, cached_transforms

__all__ = [
    "AttentionQuant",
    "PreparedModel",
    "QuantLinear",
    "TransformedEmbedding",
    "freeze_model",
    "has_formats",
    "maps_on_activations",
    "prepare_model",
    "quantization_disabled",
    "quantizes",
    "rtn_weights",
    "set_quantization",
    "shared_operands",
]

# Placements applied to activations as the model runs: they stay after freeze_model folds the rest.
_ONLINE_PLACEMENTS = ("pre_linear", "o_proj", "down_proj", "qk")


# --- operands shared within one forward -----------------------------------------------------------


class _SharedOperands:
    """The operands computed in one forward, for the linears that read the same tensor (q/k/v, gate/up).

    An entry is used only for the very tensor it was computed from (same object, same version), so a
    hit returns exactly what computing again would; the last few entries are kept (q/k/v and gate/up
    read their input one after the other).
    """

    SIZE = 4

    def __init__(self) -> None:
        self.entries: OrderedDict[tuple, tuple[torch.Tensor, int, torch.Tensor]] = OrderedDict()

    def get(self, key: tuple, x: torch.Tensor, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        hit = self.entries.get(key)
        if hit is not None and hit[0] is x and hit[1] == x._version:
            return hit[2]
        value = compute()
        self.entries[key] = (x, x._version, value)
        self.entries.move_to_end(key)
        while len(self.entries) > self.SIZE:
            self.entries.popitem(last=False)
        return value


_shared: _SharedOperands | None = None


@contextlib.contextmanager
def shared_operands() -> Iterator[None]:
    """Inside the block, linears that turn one input tensor into the same operand compute it once.

    prepare_model opens it for every forward of the model; run a decoder block alone inside it to get
    the same sharing. The entries go when the block ends.
    """
    global _shared
    outer = _shared
    _shared = outer or _SharedOperands()
    try:
        yield
    finally:
        _shared = outer


def _shared_or_computed(key: tuple, x: torch.Tensor, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    return compute() if _shared is None else _shared.get(key, x, compute)


# --- quantized linear ----------------------------------------------------------------------------


def _fake_quantizer(rounding_noise: bool) -> Callable[..., torch.Tensor]:
    """Round to nearest (mx.quantize), or its noisy stand-in while rounding_noise is on."""
    return mx.with_rounding_noise if rounding_noise else mx.quantize


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
        self.weight_format = None if weight_format is None else get_format(weight_format)
        self.act_format = None if act_format is None else get_format(act_format)
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
        # While on (maps_on_activations) and the weight is not quantized, maps that cost less applied to
        # the activations than folded into the weight act on the activations (_forward_online).
        self.online_maps = False
        # The output features of every linear that reads the same input (q/k/v, gate/up; prepare_model
        # sets it): a map applied to that input is applied once for all of them.
        self.input_group_out = self.out_features
        # While on (rounding_noise), weights and activations get noise as wide as their rounding step
        # instead of being rounded: calibration's noisy stand-in for the quantizer.
        self.rounding_noise = False

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
        if self.frozen:
            return self.weight.float(), None if self.bias is None else self.bias.float()
        return self._folded((*self.folded_in, *self.online_in), tuple(self.out_map))

    def _folded(
        self, in_maps: Sequence[Transform], out_maps: Sequence[Transform]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W', b') in float32 with the given input maps' inverses and output maps folded in."""
        weight = self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        for transform in in_maps:
            weight = transform.fold_into(weight)
            if transform.shift is not None:
                shift_term = weight @ transform.shift
                bias = -shift_term if bias is None else bias - shift_term
        for transform in out_maps:
            weight = transform.apply_matrix(weight.T).T
            if bias is not None:
                bias = transform(bias)
            elif transform.shift is not None:
                bias = transform.shift
        return weight, bias

    def _forward_weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        # Once frozen and outside autograd the quantized weight never changes: compute it once.
        cacheable = self.frozen and not torch.is_grad_enabled() and not self.rounding_noise
        key = self._cache_key()
        if cacheable and self._cached_weight is not None and self._cached_weight[0] == key:
            return self._cached_weight[1], self.bias
        weight, bias = self.effective_weight_and_bias()
        if self.quantize_weights and not self.weight_is_quantized:
            fake_quantize = _fake_quantizer(self.rounding_noise)
            weight = fake_quantize(weight, self.weight_format, self.weight_block_size, dim=-1, clip_ratio=self.weight_clip)
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
        return _shared_or_computed(self.operand_key(), x, lambda: self._gemm_input(x))

    def _gemm_input(self, x: torch.Tensor) -> torch.Tensor:
        return self._quantized_act(self.transformed_input(x))

    def _quantized_act(self, y: torch.Tensor) -> torch.Tensor:
        if self.quantize_acts:
            fake_quantize = _fake_quantizer(self.rounding_noise)
            y = fake_quantize(y, self.act_format, self.act_block_size, dim=-1, clip_ratio=self.act_clip)
        return y

    def measured_operand(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(y, Q(y)): the operand before and after activation quantization, for a measurement hook that runs
        before this linear's forward; within the model's forward that forward then reuses Q(y) instead of
        computing the maps and the quantization a second time."""
        y = self.transformed_input(x)
        return y, _shared_or_computed(self.operand_key(), x, lambda: self._quantized_act(y))

    def operand_key(self) -> tuple:
        """Linears with equal keys turn one input tensor into the same GEMM operand (q/k/v; gate/up)."""
        clip = None if self.act_clip is None else id(self)
        fmt = None if self.act_format is None else self.act_format.name
        online = tuple(id(t) for t in self.online_in)
        return self.in_features, online, fmt, self.act_block_size, self.quantize_acts, clip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.online_maps and not self.frozen and not (self.quantize_weights and not self.weight_is_quantized):
            return self._forward_online(x)
        x = self.gemm_input(x)
        weight, bias = self._forward_weight_and_bias()
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    def _online_pays(self, transform: Transform, tokens: int, output_map: bool) -> bool:
        """Whether applying a map to the activations of `tokens` rows costs less than folding it into the
        weight, in multiply-adds. Folding: the product with the weight (out x in x dim) and, under autograd,
        its backward (twice that) plus the weight-sized gradient of the folded weight (out x in per row).
        Applying: apply_cost per row, thrice under autograd, and an input map once for every linear that
        reads the same input (input_group_out output features in all); an output map is this linear's."""
        grad = torch.is_grad_enabled()
        passes = 3 if grad else 1
        weight = (self.out_features if output_map else self.input_group_out) * self.in_features
        fold = passes * weight * transform.dim + (weight * tokens if grad else 0)
        return passes * transform.apply_cost() * tokens < fold

    def _forward_online(self, x: torch.Tensor) -> torch.Tensor:
        """forward's function for an unquantized weight, y = W A^-1 Q(A x + b), computed as
        W (A^-1 (Q(A x + b) - b)) with output maps applied to the output, where that costs less than
        folding (_online_pays), so that autograd never forms those maps' weight-sized gradients. Only the
        maps nearest the weight can stay folded, so each chain splits into a folded part and an online
        rest. Exact in real arithmetic; float rounding differs from folding.
        """
        tokens = x.numel() // self.in_features
        chain = [*self.folded_in, *self.online_in]
        split = max((i + 1 for i, t in enumerate(chain) if not self._online_pays(t, tokens, False)), default=0)
        out_split = max(
            (i + 1 for i, t in enumerate(self.out_map) if not self._online_pays(t, tokens, True)), default=0
        )
        weight, bias = self._folded(chain[:split], self.out_map[:out_split])
        inverted = chain[split:]

        def operand() -> torch.Tensor:
            z = self.gemm_input(x)
            for transform in reversed(inverted):
                z = transform.inverse(z)
            return z

        z = _shared_or_computed((*self.operand_key(), *(id(t) for t in inverted)), x, operand)
        y = F.linear(z, weight.to(z.dtype), None if bias is None else bias.to(z.dtype))
        for transform in self.out_map[out_split:]:
            y = transform(y)
        return y

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


# --- q/k rotation and the quantized KV cache, inside transformers' attention ------------------------


class AttentionQuant(nn.Module):
    """What latmix does between an attention module's projections and its scores (models.attention).

    qk: an orthogonal map applied to q and k after RoPE ((q R^T)(k R^T)^T = q k^T, scores unchanged);
    kv_format: K and V MX-quantized per head along head_dim while quantize_kv is on.
    """

    def __init__(self, qk: Transform | None, kv_format: str | None, kv_block_size: int | None) -> None:
        super().__init__()
        self.qk = qk
        self.kv_format = kv_format
        self.kv_block_size = kv_block_size
        self.quantize_kv = kv_format is not None
        self.rounding_noise = False

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
        if self.qk is not None:
            query, key = self.qk(query), self.qk(key)
        if self.quantize_kv:
            fake_quantize = _fake_quantizer(self.rounding_noise)
            key = fake_quantize(key, self.kv_format, self.kv_block_size, dim=-1)
            value = fake_quantize(value, self.kv_format, self.kv_block_size, dim=-1)
        return query, key, value


# --- the one call --------------------------------------------------------------------------------


@dataclass
class PreparedModel:
    """A model as prepare_model left it, and what latmix keeps about it.

    transforms: every transform by stable name ("residual", "layers.{i}.pre_linear_attn|pre_linear_mlp|
    attn_vo|o_proj|down_proj|qk"); fixed families have no trainable parameters, and after freeze_model only
    the online ones remain. reference: the original model's logits on prepare_model's deviation_ids.
    residual: the map T1 of the residual stream (None without one), kept after it is folded: it maps
    the original model's hidden states into this model's basis.
    """

    model: nn.Module
    adapter: LlamaFamilyAdapter
    transforms: dict[str, Transform]
    reference: Reference | None = None
    residual: Transform | None = None

    @property
    def offload(self) -> BlockOffload | None:
        """The model's block offload (latmix.offload), or None when its blocks stay on the device."""
        return offload_of(self.model)

    def resident(self, block: nn.Module) -> contextlib.AbstractContextManager:
        """Hold one decoder block on the compute device for the duration (nothing to do without offload)."""
        return resident(self.model, block)

    def fp_deviation(self) -> dict[str, float]:
        """The full-precision deviation from the original model (fidelity.deviation), quantizers off."""
        if self.reference is None:
            raise ValueError("no reference logits: pass deviation_ids to prepare_model")
        with quantization_disabled(self.model), maps_on_activations(self.model):
            return deviation(self.model, self.reference)


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


def _across_heads(transform: Transform | None, head_dim: int) -> Transform | None:
    return None if transform is None else AcrossHeads(transform, head_dim)


def _present(*transforms: Transform | None) -> list[Transform]:
    return [t for t in transforms if t is not None]


def prepare_model(
    model: nn.Module,
    transform_cfg: TransformConfig,
    quant_cfg: QuantConfig,
    *,
    deviation_ids: torch.Tensor | None = None,
) -> PreparedModel:
    """Transform and quantize `model` in place; returns its PreparedModel.

    deviation_ids (a few short sequences, e.g. (2, 128)): the original model's logits on them are kept
    (on the CPU) as the handle's reference, so that PreparedModel.fp_deviation() measures the
    full-precision deviation of the transformed model, now or after calibration. This matters for a
    non-orthogonal residual transform (approximate: true); it is ~0 otherwise.
    If no transform has trainable parameters the model is frozen right away (transforms folded once).
    """
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ValueError("this model was already prepared by latmix; load a fresh copy")
    adapter = get_adapter(model)
    quant_cfg.check_dimensions(*model_dimensions(model.config))
    reference = None if deviation_ids is None else Reference.of(model, deviation_ids)

    make = _TransformFactory(transform_cfg, adapter.embed_tokens.weight.device)
    residual = make("residual", "residual", adapter.hidden_size)
    # Transforms on the normalized stream act on n(h), with the RMSNorm weight moved into the readers
    # (required for residual; for pre_linear unless transform.fold_norms is false, when the maps act on
    # the norm's output with its weight, which keeps channels the norm zeroes out of the quantized
    # operand). Plain RTN keeps the norms as they are.
    pre_linear = "pre_linear" in transform_cfg.active()
    if residual is not None or (pre_linear and transform_cfg.fold_norms):
        adapter.fold_norms()
    for index, layer in enumerate(adapter.layers()):
        _prepare_layer(adapter, index, layer, make, residual, quant_cfg)

    if residual is not None:
        adapter.set_embed_tokens(TransformedEmbedding(adapter.embed_tokens, residual))
        adapter.set_lm_head(QuantLinear(adapter.lm_head, folded_in=[residual]))
    if "qk" in transform_cfg.active() or quant_cfg.kv_format is not None:
        attention.install(model)
    if quant_cfg.weight_quantizer == "gptq":
        set_quantization(model, weights=False, acts=quant_cfg.act_format is not None)

    prepared = PreparedModel(model, adapter, make.built, reference, residual)
    _per_forward_caches(model)
    if not any(p.requires_grad for t in make.built.values() for p in t.parameters()):
        freeze_model(prepared)
    return prepared


def _prepare_layer(
    adapter: LlamaFamilyAdapter, index: int, layer: nn.Module, make: _TransformFactory, residual: Transform | None,
    quant_cfg: QuantConfig,
) -> None:
    """One decoder block: each linear wrapped with the maps around it, and its attention step."""
    # A block's own maps live where the block does (in CPU storage when its model is offloaded).
    at = next(layer.parameters()).device
    pre_attn = make("pre_linear", f"layers.{index}.pre_linear_attn", adapter.hidden_size, at)
    pre_mlp = make("pre_linear", f"layers.{index}.pre_linear_mlp", adapter.hidden_size, at)
    vo = make("attn_vo", f"layers.{index}.attn_vo", adapter.head_dim, at)
    heads = make("o_proj", f"layers.{index}.o_proj", adapter.num_heads, at)
    down = make("down_proj", f"layers.{index}.down_proj", adapter.intermediate_size, at)
    for role in ("q", "k"):
        _wrap(adapter, layer, role, quant_cfg, folded_in=_present(residual), online_in=_present(pre_attn))
    v_out = _present(_per_head(vo, adapter.num_kv_heads))
    _wrap(adapter, layer, "v", quant_cfg, folded_in=_present(residual), online_in=_present(pre_attn), out_map=v_out)
    o_in = _present(_per_head(vo, adapter.num_heads))
    o_online = _present(_across_heads(heads, adapter.head_dim))
    _wrap(adapter, layer, "o", quant_cfg, folded_in=o_in, online_in=o_online, out_map=_present(residual))
    for role in ("gate", "up"):
        _wrap(adapter, layer, role, quant_cfg, folded_in=_present(residual), online_in=_present(pre_mlp))
    _wrap(adapter, layer, "down", quant_cfg, online_in=_present(down), out_map=_present(residual))
    _share_inputs(adapter.attn_readers(layer))
    _share_inputs(adapter.mlp_readers(layer))
    qk = make("qk", f"layers.{index}.qk", adapter.head_dim, at)
    if qk is not None or quant_cfg.kv_format is not None:
        kv_block = quant_cfg.block_for(quant_cfg.kv_format)
        attention.attach(adapter.attention(layer), AttentionQuant(qk, quant_cfg.kv_format, kv_block))


def _wrap(
    adapter: LlamaFamilyAdapter, layer: nn.Module, role: str, quant_cfg: QuantConfig, **transforms: list[Transform]
) -> None:
    """The layer's linear of `role` replaced by a QuantLinear with these maps (quantized if its role is)."""
    quantized = role in quant_cfg.quantized_roles
    linear = QuantLinear(
        adapter.linear(layer, role),
        weight_format=quant_cfg.weight_format if quantized else None,
        act_format=quant_cfg.act_format if quantized else None,
        weight_block_size=quant_cfg.block_for(quant_cfg.weight_format),
        act_block_size=quant_cfg.block_for(quant_cfg.act_format),
        **transforms,
    )
    adapter.set_linear(layer, role, linear)


def _share_inputs(linears: Sequence[nn.Module]) -> None:
    """Tell the linears that read one input (q/k/v; gate/up) how many output features read it."""
    total = sum(linear.out_features for linear in linears)
    for linear in linears:
        linear.input_group_out = total


def _per_forward_caches(model: nn.Module) -> None:
    """Each forward builds every learnable transform's matrices once, not once per linear folding it, and
    computes each shared operand once (shared_operands)."""
    open_caches: list[contextlib.ExitStack] = []

    def enter(module, args):
        stack = contextlib.ExitStack()
        stack.enter_context(cached_transforms())
        stack.enter_context(shared_operands())
        open_caches.append(stack)

    def leave(module, args, output):
        open_caches.pop().close()

    model.register_forward_pre_hook(enter)
    model.register_forward_hook(leave, always_call=True)


# --- model-wide switches -------------------------------------------------------------------------


def _quant_linears(model: nn.Module) -> Iterator[QuantLinear]:
    return (m for m in model.modules() if isinstance(m, QuantLinear))


def _kv_quantizers(model: nn.Module) -> Iterator[AttentionQuant]:
    return (m for m in model.modules() if isinstance(m, AttentionQuant) and m.kv_format is not None)


def set_quantization(model: nn.Module, weights: bool, acts: bool) -> None:
    """Turn weight / activation (and KV-cache) quantization on or off wherever a format is configured."""
    for linear in _quant_linears(model):
        linear.quantize_weights = weights and linear.weight_format is not None
        linear.quantize_acts = acts and linear.act_format is not None
    for attention_quant in _kv_quantizers(model):
        attention_quant.quantize_kv = acts


def quantizes(model: nn.Module, *, with_rtn_weights: bool = False) -> bool:
    """Whether a forward of the model quantizes anything as its switches stand (with_rtn_weights: as
    it would inside rtn_weights(model))."""
    for linear in _quant_linears(model):
        weights = linear.quantize_weights or linear.weight_is_quantized
        weights = weights or (with_rtn_weights and linear.weight_format is not None)
        if weights or linear.quantize_acts:
            return True
    return any(m.quantize_kv for m in _kv_quantizers(model))


def has_formats(model: nn.Module) -> bool:
    """Whether any linear or KV cache of the model has an MX format configured (quant is not none)."""
    return any(m.weight_format or m.act_format for m in _quant_linears(model)) or any(_kv_quantizers(model))


@contextlib.contextmanager
def quantization_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the model in full precision inside the block; the previous switches come back after."""
    linears = list(_quant_linears(model))
    kv_quantizers = list(_kv_quantizers(model))
    saved = [(m.quantize_weights, m.quantize_acts) for m in linears]
    saved_kv = [m.quantize_kv for m in kv_quantizers]
    set_quantization(model, weights=False, acts=False)
    try:
        yield model
    finally:
        for m, (w, a) in zip(linears, saved, strict=True):
            m.quantize_weights, m.quantize_acts = w, a
        for m, kv in zip(kv_quantizers, saved_kv, strict=True):
            m.quantize_kv = kv


@contextlib.contextmanager
def maps_on_activations(model: nn.Module) -> Iterator[None]:
    """Inside the block, linears whose weights are not quantized apply cheap maps to their activations
    instead of folding them into the weight every forward (QuantLinear._forward_online): the same
    function, without weight-sized gradients. For calibration, while the weights wait for GPTQ."""
    linears = list(_quant_linears(model))
    for linear in linears:
        linear.online_maps = True
    try:
        yield
    finally:
        for linear in linears:
            linear.online_maps = False


@contextlib.contextmanager
def rtn_weights(model: nn.Module) -> Iterator[None]:
    """Inside the block every linear with a weight format fake-quantizes its weight (round to nearest),
    also where GPTQ will write the weights later; the previous switches come back after."""
    linears = [m for m in _quant_linears(model) if m.weight_format is not None]
    saved = [m.quantize_weights for m in linears]
    for linear in linears:
        linear.quantize_weights = True
    try:
        yield
    finally:
        for linear, flag in zip(linears, saved, strict=True):
            linear.quantize_weights = flag


@contextlib.contextmanager
def rounding_noise(model: nn.Module) -> Iterator[None]:
    """Inside the block every quantizer of the model (weights, activations, KV cache) adds noise as wide
    as its rounding step instead of rounding (mx.with_rounding_noise): a loss without rounding flips,
    for learning the transforms (calib.rounding=noise). Round to nearest comes back after."""
    quantizers = [*_quant_linears(model), *_kv_quantizers(model)]
    for quantizer in quantizers:
        quantizer.rounding_noise = True
    try:
        yield
    finally:
        for quantizer in quantizers:
            quantizer.rounding_noise = False


def freeze_model(prepared: PreparedModel) -> None:
    """Fold every transform into the weights once (end of calibration): only online transforms remain."""
    adapter = prepared.adapter
    for layer in adapter.layers():
        # An offloaded block comes to the device, where a shared map (T1) lives, to fold it.
        with prepared.resident(layer):
            for linear in _quant_linears(layer):
                linear.freeze()
    for linear in _quant_linears(prepared.model):  # the rest: lm_head
        linear.freeze()
    if isinstance(adapter.embed_tokens, TransformedEmbedding):
        adapter.set_embed_tokens(adapter.embed_tokens.folded())
    prepared.transforms = {
        name: t for name, t in prepared.transforms.items() if _placement_of(name) in _ONLINE_PLACEMENTS
    }


def _placement_of(name: str) -> str:
    last = name.rsplit(".", 1)[-1]
    return "pre_linear" if last.startswith("pre_linear") else last
