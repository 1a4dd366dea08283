"""Export of a quantized model (`export=true`) and the loader that rebuilds it without calibration.

`export_model(prepared, tokenizer, exp, run_id, out_dir)` writes `<results_dir>/export/<run_id>/`:

    config.json, model.safetensors        a Hugging Face checkpoint of the same architecture: every
    tokenizer files                       transform that can be folded is folded (residual T1 into the
                                          embedding, readers and writers; T2 into v_proj/o_proj; the
                                          inverse of each online map into the linear that reads it; RMSNorm
                                          weights into their readers, norms = 1), and every quantized
                                          weight holds its MX-quantized values, dequantized, in the model
                                          dtype (exact: MX values of the formats fit the dtype)
    latmix_quant.json                     the manifest: per linear its formats, block sizes, online
                                          transforms and where its bias is; per attention module the q/k
                                          map and KV format; each transform's family, size and kwargs
    latmix_transforms.safetensors         what the online maps need: each online transform's state
                                          (`transforms/<name>/<key>`), biases the architecture has no slot
                                          for (an affine shift gives o_proj a bias Llama lacks:
                                          `linears/<path>/bias`) and learned activation clipping ratios
    latmix_mx_codes.safetensors           the same weights as MX codes: `<path>.codes` (uint8; FP4 packed
                                          two per byte along K, low nibble first; FP6/FP8/INT8 one per
                                          byte) and `<path>.scales` (uint8 E8M0, 127 = 2^0, one per 32
                                          values along K), for E8M0 formats (NVFP4: values only)

`load_quantized(path)` loads the checkpoint with transformers, puts back the QuantLinears with their
online maps, activation quantization, biases and clipping, and the attention steps, and returns a
model whose forward is the exported run's, bit for bit: the record's perplexity comes out exactly.
Loaded by plain transformers alone, the checkpoint is the folded weights without the online maps and
activation quantization: it is not the quantized model's function when the run has online maps.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from latmix import mx, record
from latmix.formats import MXFormat, get_format
from latmix.models import attention, load_model
from latmix.quantize import AttentionQuant, PreparedModel, QuantLinear
from latmix.settings import Experiment
from latmix.transforms import AcrossHeads, Transform, build_transform

__all__ = [
    "QuantizedModel", "decode_mx", "encode_mx", "export_model", "learnable_transforms", "load_quantized",
    "save_learned", "save_transforms",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = record.EXPORT_MANIFEST
SIDECAR = "latmix_transforms.safetensors"
CODES = "latmix_mx_codes.safetensors"
WEIGHTS = "model.safetensors"
E8M0_BIAS = 127


# --- the transforms' state -----------------------------------------------------------------------


def transform_state(transforms: Mapping[str, Transform], prefix: str = "") -> dict[str, torch.Tensor]:
    """Every transform's state dict under `<prefix><name>/<key>`, contiguous CPU tensors."""
    return {
        f"{prefix}{name}/{key}": value.detach().to("cpu").contiguous().clone()
        for name, transform in transforms.items()
        for key, value in transform.state_dict().items()
    }


def save_transforms(transforms: Mapping[str, Transform], path: str | Path) -> Path:
    """The transforms' state as one safetensors file (`<name>/<key>`; metadata: class and size of each)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    kinds = {name: {"class": type(t).__name__, "dim": t.dim} for name, t in transforms.items()}
    save_file(transform_state(transforms), str(path), metadata={"latmix.transforms": json.dumps(kinds)})
    return path


def learnable_transforms(prepared: PreparedModel) -> dict[str, Transform]:
    """The transforms a calibration will learn (taken before it folds them into the weights)."""
    return {name: t for name, t in prepared.transforms.items() if any(p.requires_grad for p in t.parameters())}


def save_learned(transforms: Mapping[str, Transform], results_dir: str | Path, run_id: str) -> Path | None:
    """The learned transforms of a run as `<results_dir>/transforms/<run_id>.safetensors` (None: nothing learned)."""
    if not transforms:
        return None
    return save_transforms(transforms, record.transforms_path(results_dir, run_id))


def _placement(name: str) -> str:
    last = name.rsplit(".", 1)[-1]
    return "pre_linear" if last.startswith("pre_linear") else last


# --- MX codes ------------------------------------------------------------------------------------


def _encode_element(values: torch.Tensor, fmt: MXFormat) -> torch.Tensor:
    """Element values (already on the element grid) -> their bit codes (int32), sign bit on top."""
    element = fmt.element
    if element.is_int:
        return torch.round(values * 2**element.mbits).to(torch.int32) & 0xFF
    magnitude = values.abs()
    _, exponent = torch.frexp(magnitude)
    exponent = exponent - 1  # floor(log2 |v|)
    normal = magnitude >= element.min_normal
    safe_exponent = torch.where(normal, exponent, torch.zeros_like(exponent))
    normal_fraction = (magnitude / torch.ldexp(torch.ones_like(magnitude), safe_exponent) - 1) * 2**element.mbits
    fraction = torch.where(normal, normal_fraction, magnitude / element.min_subnormal)
    field = torch.where(normal, exponent + element.bias, torch.zeros_like(exponent))
    sign = torch.signbit(values).to(torch.int32)
    return (sign << (element.ebits + element.mbits)) | (field.to(torch.int32) << element.mbits) | torch.round(
        fraction).to(torch.int32)


def _decode_element(codes: torch.Tensor, fmt: MXFormat) -> torch.Tensor:
    element = fmt.element
    codes = codes.to(torch.int32)
    if element.is_int:
        signed = torch.where(codes >= 128, codes - 256, codes)
        return signed.float() / 2**element.mbits
    fraction = (codes & ((1 << element.mbits) - 1)).float()
    field = (codes >> element.mbits) & ((1 << element.ebits) - 1)
    sign = torch.where(((codes >> (element.ebits + element.mbits)) & 1) == 1, -1.0, 1.0)
    normal = torch.ldexp(1 + fraction / 2**element.mbits, field - element.bias)
    subnormal = fraction * element.min_subnormal
    return sign * torch.where(field > 0, normal, subnormal)


def _bits(fmt: MXFormat) -> int:
    return fmt.element.bits


def encode_mx(weight: torch.Tensor, fmt: MXFormat | str, block_size: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """MX-quantized values (out, K) -> (codes, E8M0 scales) that decode to them exactly, or None.

    The scale of a block is 2^(floor(log2 max|q|) - emax) (what the quantizer chose, or one binade
    below where GPTQ's error feedback shrank the block after its scale was fixed; both decode to the
    same values), raised where a value would not be representable. None for NVFP4 (not E8M0) or when
    the values are not MX values of the format.
    """
    fmt = get_format(fmt)
    if fmt.scale != "e8m0" or weight.shape[-1] % block_size:
        return None
    values = weight.detach().float().cpu()
    blocks = values.reshape(-1, values.shape[-1] // block_size, block_size)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    _, top = torch.frexp(amax)
    scale = torch.where(amax > 0, top - 1 - fmt.element.emax, torch.full_like(top, mx.E8M0_MIN_EXP))
    scale = scale.clamp(mx.E8M0_MIN_EXP, mx.E8M0_MAX_EXP)
    codes = torch.zeros(blocks.shape, dtype=torch.int32)
    pending = torch.ones(amax.shape, dtype=torch.bool)
    for _ in range(4):  # the chosen binade, or one to three above (E4M3's reserved top code)
        unit = torch.ldexp(torch.ones_like(amax), scale)
        scaled = blocks / unit
        trial = _encode_element(scaled.clamp(-fmt.element.max_normal, fmt.element.max_normal), fmt)
        exact = (_decode_element(trial, fmt) * unit == blocks).all(dim=-1, keepdim=True)
        take = pending & exact
        codes = torch.where(take, trial, codes)
        pending &= ~exact
        if not pending.any():
            break
        scale = torch.where(pending, (scale + 1).clamp(max=mx.E8M0_MAX_EXP), scale)
    if pending.any():
        return None
    codes = codes.to(torch.uint8).reshape(values.shape)
    if _bits(fmt) == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return codes, (scale + E8M0_BIAS).to(torch.uint8).reshape(*values.shape[:-1], -1)


def decode_mx(codes: torch.Tensor, scales: torch.Tensor, fmt: MXFormat | str, block_size: int) -> torch.Tensor:
    """(codes, E8M0 scales) of encode_mx -> the float32 values."""
    fmt = get_format(fmt)
    codes = codes.to(torch.int32)
    if _bits(fmt) == 4:
        codes = torch.stack([codes & 0xF, codes >> 4], dim=-1).reshape(*codes.shape[:-1], -1)
    values = _decode_element(codes, fmt)
    unit = torch.ldexp(torch.ones(scales.shape), scales.to(torch.int32) - E8M0_BIAS)
    blocks = values.reshape(*values.shape[:-1], -1, block_size) * unit[..., None]
    return blocks.reshape(values.shape)


# --- export --------------------------------------------------------------------------------------


def _format_name(fmt: MXFormat | None) -> str | None:
    return None if fmt is None else fmt.name


@torch.no_grad()
def exported_weight(linear: QuantLinear) -> tuple[torch.Tensor, bool]:
    """(the weight as the linear's forward uses it, in the stored dtype; whether it is MX-quantized)."""
    weight, _ = linear.effective_weight_and_bias()
    quantized = linear.quantize_weights or linear.weight_is_quantized
    if linear.quantize_weights and not linear.weight_is_quantized:
        weight = mx.quantize(weight, linear.weight_format, linear.weight_block_size, dim=-1, clip_ratio=linear.weight_clip)
    return weight.to(linear.weight.dtype), quantized


def _skeleton_keys(config: Any) -> set[str]:
    """The state-dict keys of the architecture, from an empty (meta) model of the config."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    return set(skeleton.state_dict())


def _export_config(model: nn.Module) -> Any:
    import copy

    config = copy.deepcopy(model.config)
    implementation = config._attn_implementation or "eager"
    config._attn_implementation = implementation.removeprefix("latmix_")
    config.dtype = model.get_input_embeddings().weight.dtype  # the model's (transforms compute in float32)
    return config


@dataclass
class _Gathered:
    """The tensors an export writes, gathered module by module, and the online transforms they use."""

    names: dict[int, str]  # id(transform) -> its name in PreparedModel.transforms
    weights: dict[str, torch.Tensor] = field(default_factory=dict)  # model.safetensors
    sidecar: dict[str, torch.Tensor] = field(default_factory=dict)  # latmix_transforms.safetensors
    codes: dict[str, torch.Tensor] = field(default_factory=dict)  # latmix_mx_codes.safetensors
    used: dict[str, Transform] = field(default_factory=dict)
    across_heads: dict[str, int] = field(default_factory=dict)  # name -> head_dim of a map acting across heads

    def use(self, transform: Transform, where: str) -> str:
        """The online transform's name, noted as used (its state goes in the sidecar). A map across the
        heads (AcrossHeads, before o_proj) is named and saved as the heads map it tiles."""
        tiled = isinstance(transform, AcrossHeads)
        inner = transform.transform if tiled else transform
        if id(inner) not in self.names:
            raise ValueError(f"{where}: an online transform that PreparedModel.transforms does not name")
        name = self.names[id(inner)]
        self.used[name] = inner
        if tiled:
            self.across_heads[name] = transform.head_dim
        return name


@torch.no_grad()
def export_model(
    prepared: PreparedModel, tokenizer: Any, exp: Experiment, run_id: str, out_dir: str | Path,
    resolved: Mapping[str, Any] | None = None,
) -> Path:
    """Write the quantized model to `out_dir` (replaced if it exists); returns it. See the module doc."""
    model = prepared.model
    linears = {path: m for path, m in model.named_modules() if isinstance(m, QuantLinear)}
    if any(not linear.frozen for linear in linears.values()):
        raise ValueError("export needs a frozen model (after calibration): transforms not yet folded")
    steps = {path: m for path, m in model.named_modules() if isinstance(m, AttentionQuant)}
    config = _export_config(model)
    expected = _skeleton_keys(config)

    gathered = _Gathered(names={id(t): name for name, t in prepared.transforms.items()})
    linear_entries = {path: _linear_entry(gathered, path, linear, expected) for path, linear in linears.items()}
    attention_entries = {path.rsplit(".", 1)[0]: _attention_entry(gathered, path, step) for path, step in steps.items()}
    _add_architecture_weights(gathered.weights, model, expected, config, inside=(*linears, *steps))
    gathered.sidecar.update(transform_state(gathered.used, prefix="transforms/"))
    manifest = {
        "format_version": FORMAT_VERSION,
        "run_id": run_id,
        "model": exp.model.name, "quant": exp.quant_name, "transform": exp.transform_name,
        "weight_quantizer": exp.quant.weight_quantizer,
        "dtype": str(config.dtype).removeprefix("torch."),
        "quant_config": {"weight_format": exp.quant.weight_format, "act_format": exp.quant.act_format,
                         "block_size": exp.quant.block_size, "kv_format": exp.quant.kv_format},
        "transforms": _transform_entries(gathered, exp.transform.active()),
        "linears": linear_entries,
        "attention": attention_entries,
        "config": dict(resolved) if resolved is not None else None,
    }
    out_dir = _write_export(Path(out_dir), gathered, config, tokenizer, manifest)
    log.info("quantized model exported to %s (load it with latmix.export.load_quantized)", out_dir)
    return out_dir


def _linear_entry(gathered: _Gathered, path: str, linear: QuantLinear, expected: set[str]) -> dict[str, Any]:
    """The linear's manifest entry; its weight, bias, clipping ratios and MX codes go in `gathered`."""
    weight, quantized = exported_weight(linear)
    gathered.weights[f"{path}.weight"] = weight.cpu().contiguous()
    entry = {
        "weight_format": _format_name(linear.weight_format), "act_format": _format_name(linear.act_format),
        "weight_block_size": linear.weight_block_size, "act_block_size": linear.act_block_size,
        "quantize_weights": linear.quantize_weights, "quantize_acts": linear.quantize_acts,
        "weight_quantized": quantized, "bias": None, "act_clip": False, "codes": None,
        "online_in": [gathered.use(transform, path) for transform in linear.online_in],
    }
    if linear.bias is not None:
        bias, key = linear.bias.detach().cpu().contiguous(), f"{path}.bias"
        if key in expected:
            gathered.weights[key], entry["bias"] = bias, "model"
        else:  # an affine shift gives a linear a bias the architecture has no slot for
            gathered.sidecar[f"linears/{path}/bias"], entry["bias"] = bias, "latmix"
    if linear.act_clip is not None:
        gathered.sidecar[f"linears/{path}/act_clip"] = linear.act_clip.detach().cpu().contiguous().clone()
        entry["act_clip"] = True
    if quantized and (encoded := encode_mx(weight, linear.weight_format, linear.weight_block_size)) is not None:
        gathered.codes[f"{path}.codes"], gathered.codes[f"{path}.scales"] = encoded
        entry["codes"] = f"{linear.weight_format.element.name}, E8M0 scale per {linear.weight_block_size}"
    return entry


def _attention_entry(gathered: _Gathered, path: str, step: AttentionQuant) -> dict[str, Any]:
    return {
        "qk": None if step.qk is None else gathered.use(step.qk, path),
        "kv_format": step.kv_format, "kv_block_size": step.kv_block_size, "quantize_kv": step.quantize_kv,
    }


def _add_architecture_weights(
    weights: dict[str, torch.Tensor], model: nn.Module, expected: set[str], config: Any, inside: tuple[str, ...]
) -> None:
    """The architecture's weights outside the quantized modules (embeddings, norms, the head), tied
    ones once; ValueError if one it needs has no value."""
    inside = tuple(f"{path}." for path in inside)
    for key, value in model.state_dict().items():
        if key in expected and not key.startswith(inside) and key not in weights:
            weights[key] = value.detach().cpu().contiguous()
    _untie(weights, config)
    missing = sorted(expected - set(weights) - _tied_keys(config))
    if missing:
        raise ValueError(f"export: no value for {missing[:5]} of the architecture's weights")


def _transform_entries(gathered: _Gathered, specs: Mapping[str, Mapping[str, Any]]) -> dict[str, dict]:
    """Each used transform as load_quantized rebuilds it: family, size, placement and its preset's kwargs,
    and the head_dim it is tiled over where it acts across the heads."""
    entries = {}
    for name, transform in gathered.used.items():
        spec = specs[_placement(name)]
        kwargs = {k: (list(v) if isinstance(v, tuple) else v) for k, v in spec.items() if k != "family"}
        entries[name] = {"family": spec["family"], "dim": transform.dim, "placement": _placement(name), "kwargs": kwargs}
        if name in gathered.across_heads:
            entries[name]["across_heads"] = gathered.across_heads[name]
    return entries


def _write_export(out_dir: Path, gathered: _Gathered, config: Any, tokenizer: Any, manifest: dict) -> Path:
    """Written beside `out_dir` first and then renamed over it, so a failed export leaves no half of one."""
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_file(gathered.weights, str(staging / WEIGHTS), metadata={"format": "pt"})
    save_file(gathered.sidecar, str(staging / SIDECAR))
    save_file(gathered.codes, str(staging / CODES))
    config.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)
    return out_dir


def _tied_keys(config: Any) -> set[str]:
    return {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()


def _untie(weights: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """Tied embeddings are stored once (safetensors refuses shared tensors), as transformers saves them."""
    if getattr(config, "tie_word_embeddings", False):
        weights.pop("lm_head.weight", None)
    return weights


# --- load ----------------------------------------------------------------------------------------


@dataclass
class QuantizedModel:
    model: nn.Module
    tokenizer: Any
    manifest: dict[str, Any]


@torch.no_grad()
def load_quantized(path: str | Path, device: str | torch.device = "cpu") -> QuantizedModel:
    """Rebuild an exported quantized model (transformers + latmix, no calibration); see the module doc."""
    path = Path(path)
    if not (path / MANIFEST).exists():
        raise FileNotFoundError(f"{path} holds no {MANIFEST}: not a latmix export (run with export=true)")
    manifest = json.loads((path / MANIFEST).read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: export format {manifest.get('format_version')}, this latmix reads {FORMAT_VERSION}")
    model, tokenizer = load_model(str(path), manifest["dtype"], device)
    sidecar = load_file(str(path / SIDECAR))

    transforms: dict[str, Transform] = {}
    for name, spec in manifest["transforms"].items():
        transform = build_transform(spec["family"], spec["dim"], **spec["kwargs"])
        prefix = f"transforms/{name}/"
        transform.load_state_dict({k[len(prefix):]: v for k, v in sidecar.items() if k.startswith(prefix)})
        if "across_heads" in spec:
            transform = AcrossHeads(transform, spec["across_heads"])
        transforms[name] = transform.requires_grad_(False).to(device)

    for module_path, entry in manifest["linears"].items():
        linear = QuantLinear(
            model.get_submodule(module_path),
            online_in=[transforms[name] for name in entry["online_in"]],
            weight_format=entry["weight_format"], act_format=entry["act_format"],
            weight_block_size=entry["weight_block_size"], act_block_size=entry["act_block_size"],
        )
        if entry["bias"] == "latmix":
            linear.bias = nn.Parameter(sidecar[f"linears/{module_path}/bias"].to(device), requires_grad=False)
        if entry["act_clip"]:
            linear.act_clip = nn.Parameter(sidecar[f"linears/{module_path}/act_clip"].to(device), requires_grad=False)
        linear.frozen = True  # the checkpoint's weights already hold every folded transform
        linear.weight_is_quantized = entry["weight_quantized"]
        linear.quantize_weights = entry["quantize_weights"]
        linear.quantize_acts = entry["quantize_acts"]
        model.set_submodule(module_path, linear)

    for module_path, entry in manifest["attention"].items():
        qk = None if entry["qk"] is None else transforms[entry["qk"]]
        step = AttentionQuant(qk, entry["kv_format"], entry["kv_block_size"])
        step.quantize_kv = entry["quantize_kv"]
        attention.attach(model.get_submodule(module_path), step)
    if manifest["attention"]:
        attention.install(model)
    return QuantizedModel(model.eval(), tokenizer, manifest)
