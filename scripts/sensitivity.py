"""Where an MX format loses perplexity: quantization switched on at exactly one place at a time.

Loads a model as run.py does (Hydra config groups; default SmolLM2-135M, eval=quick: the first 4096
held-out tokens in windows of 256), prepares it with a transform preset (default identity) and a quant
preset (RTN weights), and measures perplexity with quantization on at one place only:

    all             every decoder linear x {both (the run's W8A8), weights only, activations only}
    role            one role (q, k, v, o, gate, up, down) in every block x {weights, acts, both}
    block           all seven linears of one decoder block x {weights, acts}
    first           every decoder linear x {acts, both}, but each window's first token's activations
                    kept in full precision (is the loss the first token's, the attention sink's?)
    noclip          every decoder linear x {both, weights, acts} with each block's E8M0 scale rounded
                    up where the OCP scale (floor) saturates the block max: the smallest power of two
                    that clips nothing (Mishra et al. 2025); how much of the loss is clipping?

and, in one more full-precision pass over the same tokens, what the quantizer does to every linear's
weight and input activation (see `mx_sums`): relative error, crest factor (max / median channel max),
blocks whose max lands in the clipping range, elements flushed to zero or left subnormal, and how much
of the squared error each of those carries. The weights' Q4_1 grid is measured too (see `weight_stats`).

    .venv/bin/python scripts/sensitivity.py --quant mxfp8                 # SmolLM2, identity, RTN
    .venv/bin/python scripts/sensitivity.py --quant mxfp4 --places all,role
    .venv/bin/python scripts/sensitivity.py --quant mxfp8 --places "" --cells 29:acts,0:weights --out STEM
    .venv/bin/python scripts/sensitivity.py --quant mxfp8 model=tiny eval.max_ppl_tokens=2048

Trailing arguments are Hydra overrides, as for run.py. Writes <out>.md (tables sorted by perplexity
increase) and <out>.json (every number, the command and the resolved settings); the JSON is rewritten
after every point, and --resume skips the points it already holds.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shlex
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from latmix import evaluate, mx
from latmix.config import compose_experiment
from latmix.experiment import load_model_checked, model_source, resolve_device
from latmix.formats import MXFormat
from latmix.hooks import Hooks
from latmix.quantize import PreparedModel, QuantLinear, prepare_model, quantization_disabled
from latmix.settings import LINEAR_ROLES, Experiment

REPO = Path(__file__).resolve().parents[1]
SIDES = {"both": (True, True), "weights": (True, False), "acts": (False, True)}
KINDS = ("all", "role", "block", "first", "noclip")


@dataclass(frozen=True)
class Place:
    """Where quantization is on: a set of linears and which of their operands."""

    name: str
    kind: str
    side: str
    linears: tuple[QuantLinear, ...]
    keep_first: int = 0  # activations of the first positions of every window left unquantized
    scale_up: bool = False  # quantize_unclipped instead of the OCP scale

    @property
    def key(self) -> str:
        return f"{self.name}/{self.side}"


def places(prepared: PreparedModel, kinds: Sequence[str] = KINDS, cells: Sequence[tuple[int, str]] = ()) -> list[Place]:
    """The places of the sweep, in the order they are measured (the totals first); `cells` adds every
    linear of one block alone, (block, side) each: kind "cell", named "<block>.<role>"."""
    adapter = prepared.adapter
    layers = adapter.layers()
    grid = [[adapter.linear(layer, role) for role in LINEAR_ROLES] for layer in layers]
    found: list[Place] = []
    if "all" in kinds:
        found += [Place("all", "all", side, tuple(m for row in grid for m in row)) for side in SIDES]
    if "role" in kinds:
        found += [Place(role, "role", side, tuple(row[j] for row in grid))
                  for j, role in enumerate(LINEAR_ROLES) for side in SIDES]
    if "block" in kinds:
        found += [Place(f"block {i}", "block", side, tuple(row))
                  for i, row in enumerate(grid) for side in ("weights", "acts")]
    if "first" in kinds:
        every = tuple(m for row in grid for m in row)
        found += [Place("all but token 0", "first", side, every, keep_first=1) for side in ("acts", "both")]
    if "noclip" in kinds:
        every = tuple(m for row in grid for m in row if not _scale_fixed(m))
        found += [Place("all, no-clip scale", "noclip", side, every, scale_up=True) for side in SIDES]
    found += [Place(f"{i}.{role}", "cell", side, (grid[i][j],)) for i, side in cells for j, role in enumerate(LINEAR_ROLES)]
    # a side with no format anywhere in the place (quant.layers leaves roles out, a weight-only preset)
    return [p for p in found if any(_formats(m, p.side) for m in p.linears)]


def _formats(linear: QuantLinear, side: str) -> bool:
    weights, acts = SIDES[side]
    return (not weights or linear.weight_format is not None) and (not acts or linear.act_format is not None)


@contextlib.contextmanager
def switched_on(model: torch.nn.Module, place: Place | None) -> Iterator[None]:
    """Inside the block only `place` quantizes (nothing when None); every switch comes back after.

    A place with keep_first or scale_up quantizes its activations in a pre-hook (the linear's own
    activation quantizer off): all positions but the first keep_first of every sequence, or with
    quantize_unclipped. scale_up quantizes the weights by swapping in quantize_unclipped(weight) for the
    block. Both only where the linear has no online maps and its stored weight is W' (no maps, or
    frozen) and not yet quantized: the hook's input and the stored weight are then the operands the
    linear would quantize."""
    swapped: list[tuple[QuantLinear, torch.Tensor]] = []
    with quantization_disabled(model), Hooks() as hooks:
        try:
            weights, acts = SIDES[place.side] if place else (False, False)
            for linear in place.linears if place else ():
                linear.quantize_weights = weights and linear.weight_format is not None
                linear.quantize_acts = acts and linear.act_format is not None
                if not (place.keep_first or place.scale_up):
                    continue
                maps = len(linear.online_in) or (not linear.frozen and (len(linear.folded_in) or len(linear.out_map)))
                if maps or linear.weight_is_quantized:
                    raise ValueError(f"{place.key}: needs linears without unfolded maps or GPTQ weights "
                                     "(transform=identity, RTN)")
                if linear.quantize_acts:
                    linear.quantize_acts = False
                    hooks.pre(linear, _quantize_input(place.keep_first, place.scale_up))
                if place.scale_up and linear.quantize_weights:
                    linear.quantize_weights = False
                    swapped.append((linear, linear.weight.data))
                    linear.weight.data = quantize_unclipped(linear.weight.data, linear.weight_format,
                                                            linear.weight_block_size)
            yield
        finally:
            for linear, weight in swapped:
                linear.weight.data = weight


def _scale_fixed(linear: QuantLinear) -> bool:
    """Whether a linear's formats have a scale quantize_unclipped cannot move (NVFP4's tensor scale)."""
    return any(f is not None and f.tensor_scale for f in (linear.weight_format, linear.act_format))


def quantize_unclipped(x: torch.Tensor, fmt: MXFormat, block: int) -> torch.Tensor:
    """MX fake quantization along the last dim with each block's E8M0 scale the smallest power of two
    at which the block max does not saturate: one binade above the OCP scale, floor(log2 amax) - emax,
    where that one clips (E4M3: amax mantissa > 1.75, E2M1: > 1.5), the same scale elsewhere."""
    if fmt.tensor_scale:
        raise ValueError(f"{fmt.name}: a tensor-scaled format has no E8M0 block scale to round up")
    blocks = x.float().reshape(*x.shape[:-1], -1, block)
    amax = blocks.abs().amax(-1, keepdim=True)
    element = fmt.element
    # an amax whose mantissa is past max_normal / 2^emax moves to the next binade; the rest stay in theirs
    bump = 2.0 ** (element.emax + 1) / element.max_normal * (1 - 2.0**-20)
    return mx.fixed_scale_rounder(fmt, amax * bump)(blocks).reshape(x.shape).to(x.dtype)


def _quantize_input(keep: int, scale_up: bool):
    """A pre-hook that MX-quantizes a linear's input (batch, seq, features) except its first `keep`
    positions, with the OCP scale or (scale_up) quantize_unclipped's."""

    def pre_hook(module: QuantLinear, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        x = args[0]
        if scale_up:
            q = quantize_unclipped(x, module.act_format, module.act_block_size)
        else:
            q = mx.quantize(x, module.act_format, module.act_block_size, dim=-1, clip_ratio=module.act_clip)
        return (torch.cat([x[..., :keep, :], q[..., keep:, :]], dim=-2), *args[1:])

    return pre_hook


def sweep(
    model: torch.nn.Module,
    ids: torch.Tensor,
    seq_len: int,
    batch_size: int,
    sweep_places: Sequence[Place],
    done: dict[str, float] | None = None,
    on_point: Any = None,
) -> tuple[float, dict[str, float]]:
    """(full-precision ppl, {place key: ppl}) on the same tokens; `done` holds points already measured."""
    done = dict(done or {})

    def ppl(place: Place | None) -> float:
        key = "fp" if place is None else place.key
        if key not in done:
            start = time.perf_counter()
            with switched_on(model, place):
                done[key] = evaluate.perplexity(model, ids, seq_len, batch_size)
            if on_point is not None:
                on_point(key, done, time.perf_counter() - start)
        return done[key]

    fp = ppl(None)
    return fp, {p.key: ppl(p) for p in sweep_places}


# --- what the quantizer does to one operand -------------------------------------------------------

SUM_KEYS = ("elements", "nonzero", "blocks", "clip_blocks", "clipped", "zeroed", "subnormal",
            "x2", "err2", "err2_clipped", "err2_small", "unchanged")


def mx_sums(x: torch.Tensor, fmt: MXFormat, block: int) -> dict[str, float]:
    """Additive counts of what latmix.mx.quantize does to x along its last dim (blocks of `block`).

    With the block's power-of-two scale X = 2^(floor(log2 amax) - emax_elem): a block clips when its max
    is above max_normal * X (E4M3: amax / 2^floor(log2 amax) > 1.75; FP4 E2M1: > 1.5); an element is
    clipped above max_normal * X, subnormal below min_normal * X, zeroed when nonzero and quantized to 0.
    err2_clipped / err2_small: the squared error of the clipped / of the subnormal elements. The
    classification needs an E8M0 scale; for NVFP4 only the error sums are filled.
    """
    x = x.detach().float().reshape(-1, x.shape[-1])
    q = mx.quantize(x, fmt, block)
    blocks, err = x.reshape(x.shape[0], -1, block), (q - x).reshape(x.shape[0], -1, block)
    sums = {"elements": x.numel(), "nonzero": (x != 0).sum(), "blocks": blocks.shape[0] * blocks.shape[1],
            "x2": x.square().sum(), "err2": err.square().sum(), "unchanged": (q == x).sum()}
    if not fmt.tensor_scale:
        element = fmt.element
        amax = blocks.abs().amax(-1, keepdim=True)
        scale = torch.ldexp(torch.ones_like(amax), torch.frexp(amax)[1] - 1 - element.emax)
        clipped, subnormal = blocks.abs() > element.max_normal * scale, blocks.abs() < element.min_normal * scale
        subnormal &= blocks != 0
        sums |= {"clip_blocks": (amax > element.max_normal * scale).sum(), "clipped": clipped.sum(),
                 "zeroed": (subnormal & (q.reshape(blocks.shape) == 0)).sum(), "subnormal": subnormal.sum(),
                 "err2_clipped": err[clipped].square().sum(), "err2_small": err[subnormal].square().sum()}
    return {k: float(v) for k, v in sums.items()}


def add_sums(total: dict[str, float], sums: dict[str, float]) -> dict[str, float]:
    return {k: total.get(k, 0.0) + sums.get(k, 0.0) for k in SUM_KEYS}


def ratios(sums: dict[str, float]) -> dict[str, float]:
    """Rates from additive sums: rel_err = ||Q(x) - x|| / ||x||, the rest fractions (of blocks, of
    nonzero elements, of the squared error)."""
    sums = add_sums({}, sums)
    err2 = sums["err2"] or 1.0
    return {
        "rel_err": (sums["err2"] / sums["x2"]) ** 0.5 if sums["x2"] else 0.0,
        "clip_blocks": sums["clip_blocks"] / sums["blocks"],
        "clipped": sums["clipped"] / max(sums["nonzero"], 1),
        "zeroed": sums["zeroed"] / max(sums["nonzero"], 1),
        "subnormal": sums["subnormal"] / max(sums["nonzero"], 1),
        "err_share_clipped": sums["err2_clipped"] / err2,
        "err_share_small": sums["err2_small"] / err2,
        "unchanged": sums["unchanged"] / sums["elements"],
    }


@torch.no_grad()
def activation_stats(
    model: torch.nn.Module, ids: torch.Tensor, seq_len: int, batch_size: int, linears: dict[str, QuantLinear]
) -> dict[str, dict[str, Any]]:
    """Per linear, over a full-precision pass on the tokens: mx_sums of its input activation (after
    online maps, as quantized), and the per-channel max |x| (crest = max / median of it); the same sums
    and max |x| for the first token of every window alone (`first`) and for the other tokens (`rest`)."""
    sums: dict[str, dict[str, float]] = {}
    split: dict[str, dict[str, dict[str, float]]] = {}
    peaks: dict[str, dict[str, float]] = {}
    channel_max: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def pre_hook(module: QuantLinear, args: tuple[torch.Tensor, ...]) -> None:
            x = module.transformed_input(args[0])
            fmt, block = module.act_format, module.act_block_size
            sums[name] = add_sums(sums.get(name, {}), mx_sums(x, fmt, block))
            parts = split.setdefault(name, {})
            for part, xs in (("first", x[..., :1, :]), ("rest", x[..., 1:, :])):
                parts[part] = add_sums(parts.get(part, {}), mx_sums(xs, fmt, block))
                top = xs.detach().abs().max().item()
                peaks.setdefault(name, {})[part] = max(peaks.get(name, {}).get(part, 0.0), top)
            peak = x.detach().abs().reshape(-1, x.shape[-1]).amax(0).float()
            channel_max[name] = torch.maximum(channel_max[name], peak) if name in channel_max else peak

        return pre_hook

    with Hooks() as hooks, switched_on(model, None):
        for name, linear in linears.items():
            if linear.act_format is not None:
                hooks.pre(linear, hook(name))
        evaluate.perplexity(model, ids, seq_len, batch_size)
    return {name: {"sums": s, "max_abs": channel_max[name].max().item(),
                   "crest": (channel_max[name].max() / channel_max[name].median().clamp_min(1e-30)).item(),
                   **{f"{part}_sums": split[name][part] for part in ("first", "rest")},
                   **{f"{part}_max_abs": peaks[name][part] for part in ("first", "rest")}}
            for name, s in sums.items()}


@torch.no_grad()
def weight_stats(linear: QuantLinear, q4_block: int = 32) -> dict[str, Any]:
    """mx_sums of the weight (as quantized, transforms folded), and its input-block grid: the most
    distinct values in a block of `q4_block` (16 for Q4_1), the RMS MX error over the mean grid step
    (max - min) / (levels - 1), and the relative MX error of the same weights moved off the grid by
    uniform noise of one grid step (does the grid make the format's error smaller or larger?)."""
    weight = linear.effective_weight_and_bias()[0]
    blocks = weight.reshape(weight.shape[0], -1, q4_block)
    levels = int((blocks.sort(-1).values.diff(dim=-1) != 0).sum(-1).max()) + 1
    step = (blocks.amax(-1, keepdim=True) - blocks.amin(-1, keepdim=True)) / max(levels - 1, 1)
    sums = mx_sums(weight, linear.weight_format, linear.weight_block_size)
    generator = torch.Generator(device=weight.device).manual_seed(0)
    noise = torch.rand(blocks.shape, generator=generator, device=weight.device) - 0.5
    off_grid = mx_sums(blocks + noise * step, linear.weight_format, linear.weight_block_size)
    return {"sums": sums, "levels": levels, "err_over_step": (sums["err2"] / weight.numel()) ** 0.5 / step.mean().item(),
            "off_grid_rel_err": ratios(off_grid)["rel_err"]}


def linear_names(prepared: PreparedModel) -> dict[str, QuantLinear]:
    adapter = prepared.adapter
    return {f"{i}.{role}": adapter.linear(layer, role) for i, layer in enumerate(adapter.layers()) for role in LINEAR_ROLES}


def place_stats(place: Place, names: dict[int, str], acts: dict[str, Any], weights: dict[str, Any]) -> dict[str, Any]:
    """The statistics of a place's linears pooled (sums added; crest and max |x| the largest)."""
    member = [names[id(m)] for m in place.linears]
    out: dict[str, Any] = {}
    if any(n in weights for n in member):
        w = [weights[n] for n in member if n in weights]
        sums: dict[str, float] = {}
        for s in w:
            sums = add_sums(sums, s["sums"])
        out["weights"] = ratios(sums) | {"err_over_step": sum(s["err_over_step"] for s in w) / len(w),
                                         "off_grid_rel_err": sum(s["off_grid_rel_err"] for s in w) / len(w),
                                         "levels": max(s["levels"] for s in w)}
    if any(n in acts for n in member):
        a = [acts[n] for n in member if n in acts]
        sums = {}
        for s in a:
            sums = add_sums(sums, s["sums"])
        out["acts"] = ratios(sums) | {"crest": max(s["crest"] for s in a), "max_abs": max(s["max_abs"] for s in a)}
    return out


def by_position(acts: dict[str, dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Per role (pooled over blocks): the activation statistics of each window's first token and of the
    other tokens (rel err, max |x|, ...)."""
    pooled: dict[str, dict[str, Any]] = {}
    for name, a in acts.items():
        if "first_sums" not in a:
            continue
        role = name.split(".", 1)[1]
        entry = pooled.setdefault(role, {"first": {}, "rest": {}, "first_max_abs": 0.0, "rest_max_abs": 0.0})
        for part in ("first", "rest"):
            entry[part] = add_sums(entry[part], a[f"{part}_sums"])
            entry[f"{part}_max_abs"] = max(entry[f"{part}_max_abs"], a[f"{part}_max_abs"])
    return {role: {part: ratios(e[part]) | {"max_abs": e[f"{part}_max_abs"], "err2": e[part]["err2"]}
                   for part in ("first", "rest")} for role, e in pooled.items()}


# --- report ---------------------------------------------------------------------------------------


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join([*lines, *("| " + " | ".join(cell(v) for v in row) + " |" for row in rows)])


def _pct(v: float) -> str:
    return f"{100 * v:.2f}%"


def report(result: dict[str, Any], top: int = 12) -> str:
    """Markdown: the sensitivity table sorted by ppl increase, then the statistics of the worst places."""
    ranked = sorted(result["rows"], key=lambda r: -r["ppl"])
    stats = {r["key"]: r.get("stats", {}) for r in ranked}
    # the statistics describe the OCP quantizer on every token: not the totals', not the counterfactuals'
    worst = [r for r in ranked if r["kind"] not in ("all", "first", "noclip")][:top]
    parts = [_summary(result), "", _sensitivity_table(ranked)]
    for section in (_activation_section(worst, stats), _weight_section(worst, stats),
                    _position_section(result.get("positions"), result["seq_len"])):
        if section:
            parts += ["", *section]
    return "\n".join(parts) + "\n"


def _summary(result: dict[str, Any]) -> str:
    gaussian = result["gaussian"]
    return (f"{result['model']} {result['quant']} (transform {result['transform']}, RTN weights): "
            f"{result['tokens']} tokens of {result['text']} at seq {result['seq_len']}; "
            f"full precision ppl {result['fp_ppl']:.3f}. "
            f"For scale, on a Gaussian operand the format's relative error is {_pct(gaussian['rel_err'])}, "
            f"{_pct(gaussian['clip_blocks'])} of its blocks clip and they carry "
            f"{_pct(gaussian['err_share_clipped'])} of its squared error.")


def _sensitivity_table(ranked: list[dict[str, Any]]) -> str:
    return _table(["#", "quantized", "operand", "ppl", "increase", "share of all/both loss"],
                  [[i + 1, r["place"], r["side"], f"{r['ppl']:.3f}", _pct(r["increase"]),
                    "–" if r["share"] is None else _pct(r["share"])]
                   for i, r in enumerate(ranked)])


def _activation_section(worst: list[dict[str, Any]], stats: dict[str, dict[str, Any]]) -> list[str]:
    rows = [[r["place"], r["side"], _pct(r["increase"]), _pct(a["rel_err"]), f"{a['max_abs']:.3g}",
             f"{a['crest']:.1f}", _pct(a["clip_blocks"]), _pct(a["err_share_clipped"]), _pct(a["subnormal"]),
             _pct(a["zeroed"]), _pct(a["err_share_small"])]
            for r in worst if r["side"] != "weights" and (a := stats[r["key"]].get("acts"))]
    if not rows:
        return []
    return ["Activations at the worst places (pooled over the place's linears; max abs: the largest "
            "|x|; crest: max over median of the per-channel max |x|; % of nonzero elements, of MX blocks, "
            "of the squared error):", "",
            _table(["quantized", "operand", "increase", "rel err", "max abs", "crest", "clip blocks",
                    "err from clipped", "subnormal", "flushed to 0", "err from subnormal"], rows)]


def _weight_section(worst: list[dict[str, Any]], stats: dict[str, dict[str, Any]]) -> list[str]:
    rows = [[r["place"], r["side"], _pct(r["increase"]), _pct(w["rel_err"]), w["levels"],
             f"{w['err_over_step']:.3f}", _pct(w["off_grid_rel_err"]), _pct(w["unchanged"]),
             _pct(w["clip_blocks"]), _pct(w["err_share_clipped"])]
            for r in worst if r["side"] != "acts" and (w := stats[r["key"]].get("weights"))]
    if not rows:
        return []
    return ["Weights at the worst places:", "",
            _table(["quantized", "operand", "increase", "rel err", "levels/32-block", "rms err / grid step",
                    "rel err off-grid", "unchanged", "clip blocks", "err from clipped"], rows)]


def _position_section(positions: dict[str, dict[str, dict[str, float]]] | None, seq_len: int) -> list[str]:
    if not positions:
        return []
    rows = [[role, f"{p['first']['max_abs']:.3g}", f"{p['rest']['max_abs']:.3g}",
             _pct(p["first"]["rel_err"]), _pct(p["rest"]["rel_err"]),
             _pct(p["first"]["err2"] / ((p["first"]["err2"] + p["rest"]["err2"]) or 1.0)),
             _pct(p["first"]["clip_blocks"]), _pct(p["rest"]["clip_blocks"])]
            for role, p in positions.items()]
    return [f"Activations by position (pooled over blocks): each window's first token (1 of {seq_len} tokens) "
            "against the rest; share of error = the first token's part of the role's squared MX error:", "",
            _table(["role", "max abs first", "max abs rest", "rel err first", "rel err rest",
                    "share of error", "clip blocks first", "clip blocks rest"], rows)]


def run(
    exp: Experiment, kinds: Sequence[str], out: Path, resume: bool, command: str, cells: Sequence[tuple[int, str]] = ()
) -> dict[str, Any]:
    """The sweep and the statistics for one experiment's model, quant and transform; writes out.json/.md."""
    device = resolve_device(exp.device)
    model, tokenizer = load_model_checked(exp, device, model_source(exp)[0])
    prepared = prepare_model(model, exp.transform, exp.quant)
    model.eval()
    seq_len = evaluate.eval_seq_len(model, exp.eval.max_seq_len)
    text = evaluate.perplexity_texts(tokenizer, exp.eval, seq_len)[0]
    batch = exp.eval.batch_size if isinstance(exp.eval.batch_size, int) else 1
    json_path = out.with_suffix(".json")
    result = _header(exp, command, text, seq_len, batch, device)
    done = _resume(result, json_path) if resume and json_path.exists() else {}

    def on_point(key: str, ppl: dict[str, float], seconds: float) -> None:
        result["seconds"][key] = seconds
        print(f"{key}: ppl {ppl[key]:.4f} ({seconds:.0f} s, load {os.getloadavg()[0]:.1f})", flush=True)
        _write(json_path, result | {"ppl": ppl})

    sweep_places = places(prepared, kinds, cells)
    fp, ppl = sweep(model, text.ids, seq_len, batch, sweep_places, done, on_point)
    names = linear_names(prepared)
    acts = activation_stats(model, text.ids, seq_len, batch, names)
    weights = {n: weight_stats(m) for n, m in names.items() if m.weight_format is not None}
    result |= {
        "fp_ppl": fp, "ppl": {"fp": fp, **ppl}, "load_average_after": os.getloadavg(),
        "gaussian": _gaussian_reference(next(iter(names.values()))),
        "rows": _rows(sweep_places, fp, ppl, {id(m): n for n, m in names.items()}, acts, weights),
        "linears": {n: {"acts": acts.get(n), "weights": weights.get(n)} for n in names},
        "positions": by_position(acts),
    }
    _write(json_path, result)
    out.with_suffix(".md").write_text(report(result))
    return result


def _header(
    exp: Experiment, command: str, text: evaluate.PerplexityText, seq_len: int, batch: int, device: torch.device
) -> dict[str, Any]:
    """What the measurement is of, and where it ran."""
    return {
        "command": command, "model": exp.model.name, "quant": exp.quant_name, "transform": exp.transform_name,
        "quant_config": dataclasses.asdict(exp.quant),
        "text": text.name, "text_source": text.source, "tokens": int(text.ids.numel()), "seq_len": seq_len,
        "batch_size": batch, "device": str(device), "torch_threads": torch.get_num_threads(),
        "load_average_before": os.getloadavg(), "seconds": {},
    }


def _resume(result: dict[str, Any], json_path: Path) -> dict[str, float]:
    """The earlier points' perplexities; their times go into `result`, which says what was resumed."""
    earlier = json.loads(json_path.read_text())
    result["seconds"] = earlier.get("seconds", {})
    result["resumed"] = sorted(earlier["ppl"])
    return earlier["ppl"]


def _gaussian_reference(linear: QuantLinear) -> dict[str, float]:
    """What the format does to a Gaussian operand, for scale: a format's error with nothing model-specific."""
    gaussian = torch.randn(4096, linear.in_features, generator=torch.Generator().manual_seed(0))
    return ratios(mx_sums(gaussian, linear.act_format or linear.weight_format,
                          linear.act_block_size or linear.weight_block_size))


def _rows(
    sweep_places: list[Place], fp: float, ppl: dict[str, float], names: dict[int, str],
    acts: dict[str, Any], weights: dict[str, Any],
) -> list[dict[str, Any]]:
    total = ppl["all/both"] - fp if "all/both" in ppl else None  # shares only against a measured total
    return [{"key": p.key, "place": p.name, "kind": p.kind, "side": p.side, "ppl": ppl[p.key],
             "increase": ppl[p.key] / fp - 1, "share": (ppl[p.key] - fp) / total if total else None,
             "stats": place_stats(p, names, acts, weights)} for p in sweep_places]


def _write(path: Path, value: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=1, default=str) + "\n")
    tmp.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quant", default="mxfp8", help="a quant preset (conf/quant); weights RTN")
    parser.add_argument("--transform", default="identity", help="a transform preset (conf/transform)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--places", default=",".join(KINDS), help=f"which kinds of places, of {','.join(KINDS)}")
    parser.add_argument("--cells", default="", help="every linear of a block alone: BLOCK:SIDE,... (e.g. 29:acts)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: 1 if load > 2)")
    parser.add_argument("--out", type=Path, default=None, help="output stem (default results/sensitivity/...)")
    parser.add_argument("--resume", action="store_true", help="skip points already in <out>.json")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for run.py")
    args = parser.parse_args()
    kinds = [k for k in args.places.split(",") if k]
    if unknown := set(kinds) - set(KINDS):
        parser.error(f"--places: unknown {sorted(unknown)}; choose from {','.join(KINDS)}")
    try:
        cells = [(int(b), side) for b, side in (c.split(":") for c in args.cells.split(",") if c)]
    except ValueError:
        parser.error(f"--cells: expected BLOCK:SIDE,...; got {args.cells!r}")
    if bad := {side for _, side in cells} - set(SIDES):
        parser.error(f"--cells: unknown sides {sorted(bad)}; choose from {','.join(SIDES)}")
    threads = args.threads or (1 if os.getloadavg()[0] > 2 else None)
    if threads:
        torch.set_num_threads(threads)
    overrides = [f"model={args.model}", f"quant={args.quant}", f"transform={args.transform}", "eval=quick",
                 "quant.weight_quantizer=rtn", "logger=none", *args.overrides]
    exp = compose_experiment(overrides)
    out = args.out or REPO / "results" / "sensitivity" / f"{exp.model.name}-{exp.quant_name}-{exp.transform_name}"
    command = shlex.join([".venv/bin/python", "scripts/sensitivity.py", *sys.argv[1:]])
    result = run(exp, kinds, out, args.resume, command, cells)
    print(report(result))
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
