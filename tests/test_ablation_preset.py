"""The ablation of LATMiX on SmolLM2 (`-m +experiment=ablation_smollm2`): one change from transform=affine
per run, each a file of conf/ablation/; every one is a distinct run that places valid maps and keeps
the model's function before anything is quantized."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import relative_error
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, LlamaConfig

from latmix import config, record
from latmix.calibrate.smooth import smooth_init
from latmix.quantize import prepare_model
from latmix.settings import QuantConfig

CONF = Path(__file__).resolve().parent.parent / "conf"
ABLATIONS = sorted(path.stem for path in (CONF / "ablation").glob("*.yaml"))

pytestmark = pytest.mark.usefixtures("one_thread")


def composed(ablation: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=["+experiment=ablation_smollm2", f"+ablation={ablation}"])


def changed_keys(cfg, base) -> set[str]:
    """The dotted keys where two configs differ, at the shallowest level (a placement switched off is one key)."""

    def diff(a, b, prefix: str) -> set[str]:
        if isinstance(a, dict) and isinstance(b, dict):
            return {key for k in a.keys() | b.keys() for key in diff(a.get(k), b.get(k), f"{prefix}{k}.")}
        return {prefix.rstrip(".")} if a != b else set()

    return diff(*(OmegaConf.to_container(c, resolve=True) for c in (cfg, base)), "")


def test_the_sweep_runs_every_ablation_once_on_smollm2_at_mxfp4():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["+experiment=ablation_smollm2"], return_hydra_config=True)
    swept = cfg.hydra.sweeper.params["+ablation"].split(",")
    assert sorted(swept) == ABLATIONS and len(set(swept)) == len(swept)
    assert (cfg.model.name, cfg.quant.name, cfg.transform.name) == ("smollm2-135m", "mxfp4", "affine")


def test_the_base_is_the_affine_preset_as_it_is():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        plain = compose("config", overrides=["model=smollm2-135m", "quant=mxfp4", "transform=affine"])
    assert changed_keys(composed("base"), plain) == set()


@pytest.mark.parametrize(
    ("ablation", "keys"),
    [
        ("alpha_0", {"calib.smooth_alpha"}),
        ("no_down_proj", {"transform.placements.down_proj"}),
        ("o_proj", {"transform.placements.o_proj"}),
        ("block_32", {f"transform.placements.{p}.block_size" for p in ("pre_linear", "attn_vo", "down_proj")}),
        ("learn_kl", {"calib.mode", "optim.lr"}),
        ("learn_kl_reg0", {"calib.mode", "optim.lr", "calib.reg_weight"}),
        ("learn_kl_noise", {"calib.mode", "optim.lr", "calib.rounding"}),
        ("learn_scales_noise", {"calib.mode", "optim.lr", "calib.rounding",
                                *(f"transform.placements.{p}.learn" for p in ("pre_linear", "attn_vo", "down_proj"))}),
        ("learn_scales_noise_64x512_b16_reg0", {
            "calib.mode", "optim.lr", "calib.rounding", "calib.n_samples", "calib.seq_len", "calib.batch_size",
            "calib.micro_batch_size", "calib.reg_weight",
            *(f"transform.placements.{p}.learn" for p in ("pre_linear", "attn_vo", "down_proj"))}),
        ("learn_flatquant_recipe", {
            "calib.mode", "calib.objective", "calib.layer_inputs", "calib.epochs", "calib.learn_clipping",
            "calib.quantize_weights", "calib.reg_weight", "optim.lr", "optim.clip_lr", "optim.grad_clip"}),
        ("learn_flatquant_recipe_noise", {
            "calib.mode", "calib.objective", "calib.layer_inputs", "calib.epochs", "calib.learn_clipping",
            "calib.quantize_weights", "calib.reg_weight", "optim.lr", "optim.clip_lr", "optim.grad_clip",
            "calib.rounding"}),
    ],
)
def test_an_ablation_changes_only_what_its_name_says(ablation, keys):
    assert changed_keys(composed(ablation), composed("base")) == keys


# Ablation presets that name a run first spelled on the command line, with the spelling that made it:
# learn_scales_noise_64x512_b16_reg0 in docs/calibration.md's seed-0 dev run, learn_flatquant_recipe_noise
# in "Rounding noise under the recipe".
SPELLED_ABLATIONS = {
    "learn_scales_noise_64x512_b16_reg0": [
        "+ablation=learn_scales_noise", "calib.n_samples=64", "calib.seq_len=512", "calib.batch_size=16",
        "calib.micro_batch_size=2", "optim.lr=2e-2", "calib.reg_weight=0"],
    "learn_flatquant_recipe_noise": ["+ablation=learn_flatquant_recipe", "calib.rounding=noise"],
}


@pytest.mark.parametrize("ablation", sorted(SPELLED_ABLATIONS))
def test_a_measured_ablation_preset_is_the_run_its_documented_command_made(ablation):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        spelled = compose("config", overrides=["+experiment=ablation_smollm2", *SPELLED_ABLATIONS[ablation]])
    assert record.run_id(OmegaConf.to_container(composed(ablation), resolve=True)) == record.run_id(
        OmegaConf.to_container(spelled, resolve=True)
    )


# The learned method presets, each the paired ablation run it was measured as, under a name of its own:
# affine_learned in docs/calibration.md "Paired on one machine", affine_recipe in README "The recipe
# against rounding noise".
NAMED_ABLATIONS = {
    "affine_learned": ["+ablation=learn_scales_noise_64x512_b16_reg0", "calib.epochs=1"],
    "affine_recipe": ["+ablation=learn_flatquant_recipe_noise", "calib.epochs=8"],
}


@pytest.mark.parametrize("preset_name", sorted(NAMED_ABLATIONS))
def test_a_learned_method_preset_is_its_paired_ablation_run_under_its_own_name(preset_name):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        preset = compose("config", overrides=["model=smollm2-135m", "quant=mxfp4", f"transform={preset_name}"])
        paired = compose("config", overrides=["+experiment=ablation_smollm2", *NAMED_ABLATIONS[preset_name]])
    assert changed_keys(preset, paired) == {"transform.name"}
    assert preset.transform.name == preset_name


def test_an_ablation_composes_on_top_of_the_recipe_preset():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        with_o_proj = compose("config", overrides=["+experiment=ablation_smollm2", "transform=affine_recipe",
                                                   "+ablation=o_proj"])
    assert with_o_proj.transform.placements.o_proj.family == "affine"
    assert (with_o_proj.calib.mode, with_o_proj.calib.epochs) == ("layer_wise", 8)


def test_a_calib_named_on_the_command_line_replaces_the_learned_presets_calibration_set():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        paper = compose("config", overrides=["model=llama3-8b", "transform=affine_learned", "calib=paper"])
    assert (paper.calib.source, paper.calib.n_samples, paper.calib.seq_len, paper.calib.epochs) == ("wikitext2", 128, 2048, 2)
    # what the preset learns stays: the scales, against rounding noise, without the volume regularizer
    assert (paper.calib.mode, paper.calib.rounding, paper.calib.reg_weight, paper.optim.lr) == ("end_to_end", "noise", 0.0, 2e-2)
    assert paper.transform.placements.down_proj.learn == "scales"


def test_every_ablation_is_a_different_run():
    ids = {name: record.run_id(OmegaConf.to_container(composed(name), resolve=True)) for name in ABLATIONS}
    assert len(set(ids.values())) == len(ABLATIONS)


def smollm2_shaped_model() -> torch.nn.Module:
    """SmolLM2-135M's shape, shrunk: head_dim 64, 3 query heads per KV head, d_ff = 3 x 2^k (a Paley Hadamard)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, num_hidden_layers=2, hidden_size=192, intermediate_size=384,
                      num_attention_heads=3, num_key_value_heads=1, head_dim=64, max_position_embeddings=64,
                      tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
    return model


@pytest.mark.parametrize("ablation", ABLATIONS)
@torch.no_grad()
def test_every_ablation_places_its_maps_and_keeps_the_function(ablation):
    exp = config.build_experiment(composed(ablation))
    model = smollm2_shaped_model()
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    reference = model(ids).logits
    prepared = prepare_model(model, exp.transform, QuantConfig())
    assert prepared.transforms or ablation == "init_identity"
    if exp.calib.smooth_alpha > 0:
        smooth_init(prepared, ids, exp.calib.smooth_alpha, batch_size=2)
    assert relative_error(prepared.model(ids).logits, reference) < 1e-4
