"""The Hydra config tree: every option of every group composes into valid settings; bad values fail clearly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_script
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from transformers import LlamaConfig

from latmix import config, record
from latmix.models import model_dimensions
from latmix.settings import TRANSFORM_FAMILIES
from latmix.transforms import TRANSFORMS, transform_kwargs

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
GROUPS = ("model", "quant", "transform", "calib", "optim", "gptq", "eval", "logger")


def options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONF / group).glob("*.yaml"))


# The model and method these tests run on unless they name their own: the embedded tiny Llama (its
# files load in milliseconds) and the literal LATMiX preset (it learns, so calibration is exercised).
# `python run.py` itself runs SmolLM2-135M with transform=affine.
ON_TINY = ("model=tiny", "transform=affine_literal")


def on_tiny(overrides: tuple[str, ...] | list[str]) -> list[str]:
    named = {override.split("=")[0] for override in overrides}
    return [pin for pin in ON_TINY if pin.split("=")[0] not in named] + list(overrides)


def compose_config(*overrides: str, hydra: bool = False, defaults: bool = False):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        chosen = list(overrides) if defaults else on_tiny(overrides)
        return compose("config", overrides=chosen, return_hydra_config=hydra)


def test_the_defaults_are_smollm2_with_latmix_as_transform_affine_gptq_and_the_local_evaluation():
    cfg = compose_config(defaults=True)
    assert (cfg.model.name, cfg.quant.name, cfg.transform.name, cfg.eval.suite, cfg.logger.mode) == (
        "smollm2-135m", "mxfp4", "affine", "local", "auto"
    )
    assert (cfg.quant.weight_format, cfg.quant.act_format, cfg.quant.weight_quantizer) == ("mxfp4", "mxfp4", "gptq")
    assert (cfg.optim.name, cfg.gptq.damp, cfg.gptq.act_order) == ("adamw", 0.01, False)
    # the measured LATMiX start (conf/transform/affine.yaml): smoothed block-diagonal maps, nothing learned
    assert (cfg.calib.smooth_alpha, cfg.calib.mode, cfg.transform.fold_norms) == (0.5, "none", False)


@pytest.mark.parametrize(("group", "option"), [(g, o) for g in GROUPS for o in options(g)])
def test_every_option_composes_into_valid_settings(group, option):
    # The papers' 2048-token calibration needs a model with as many positions (the tiny default has 512).
    model = ["model=llama3-8b"] if (group, option) == ("calib", "paper") else []
    exp = config.build_experiment(compose_config(f"{group}={option}", *model))
    assert exp.results_dir.is_absolute()
    if group == "model":
        assert exp.model.name == option
    if group in ("quant", "transform"):
        assert getattr(exp, f"{group}_name") == option


def sweep_points(experiment: str) -> list[list[str]]:
    """The overrides of every run of `-m +experiment=<experiment>`, expanded as Hydra's basic sweeper does."""
    cfg = compose_config(f"+experiment={experiment}", hydra=True, defaults=True)  # its own model
    params = [f"{key}={value}" for key, value in cfg.hydra.sweeper.params.items()]
    overrides = OverridesParser.create().parse_overrides(params)
    return [point for batch in BasicSweeper.split_arguments(overrides, max_batch_size=None) for point in batch]


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_point_of_every_experiment_sweep_composes_into_valid_settings(experiment):
    points = sweep_points(experiment)
    assert len(points) > 1, f"experiment/{experiment}.yaml sweeps nothing"
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for point in points:
            cfg = compose("config", overrides=[f"+experiment={experiment}", *point])
            exp = config.build_experiment(cfg)
            for override in point:
                key, value = override.split("=", 1)
                if key in ("transform", "model", "quant"):
                    assert {"transform": exp.transform_name, "model": exp.model.name, "quant": exp.quant_name}[key] == value


def test_the_table_sweeps_run_every_method_under_rtn_and_gptq_with_three_seeds():
    points = sweep_points("table_mxfp4")
    assert len(points) == 6 * 2 * 3
    assert len({tuple(sorted(point)) for point in points}) == len(points)


@pytest.mark.parametrize(
    "launcher", sorted(p.stem for p in (CONF / "hydra" / "launcher").glob("*.yaml"))
)
def test_every_launcher_composes(launcher):
    assert compose_config(f"hydra/launcher={launcher}", hydra=True).hydra.launcher._target_


def test_model_presets_point_at_hub_ids_and_tiny_at_the_shipped_checkpoint():
    assert compose_config("model=llama3-8b").model.name_or_path == "meta-llama/Meta-Llama-3-8B"
    assert config.build_experiment(compose_config()).model.name_or_path == str(ROOT / "models" / "tiny-llama")


def test_a_local_directory_replaces_the_hub_id(tmp_path):
    LlamaConfig(max_position_embeddings=4096).save_pretrained(tmp_path)
    exp = config.build_experiment(compose_config("model=llama3-8b", f"model.name_or_path={tmp_path}"))
    assert exp.model.name_or_path == str(tmp_path)


def test_a_local_models_files_are_checked_before_torch_is_imported(tmp_path):
    LlamaConfig(max_position_embeddings=128).save_pretrained(tmp_path)
    with pytest.raises(config.ConfigError, match=r"^calib.seq_len=256 is longer than the model's 128 positions"):
        config.build_experiment(compose_config(f"model.name_or_path={tmp_path}"))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(config.ConfigError, match=rf"^model config {tmp_path}/config.json is not readable JSON"):
        config.build_experiment(compose_config(f"model.name_or_path={tmp_path}"))


def test_tiny_outliers_is_labelled_as_such():
    exp = config.build_experiment(compose_config("model=tiny_outliers"))
    assert exp.model.name == "tiny_outliers"
    assert exp.model.outliers == {"n_channels": 4, "scale": 20.0, "seed": 0, "points": ["mlp", "attn_vo"]}


def test_qk_rotation_joins_only_when_the_kv_cache_is_quantized():
    plain = config.build_experiment(compose_config("transform=hadamard"))
    with_kv = config.build_experiment(compose_config("transform=hadamard", "quant.kv_format=mxfp4"))
    assert "qk" not in plain.transform.active()
    assert with_kv.transform.active()["qk"]["family"] == "hadamard"


def test_flatquant_calibrates_layer_wise():
    calib = compose_config("transform=flatquant").calib
    assert (calib.mode, calib.objective) == ("layer_wise", "block_mse")


def test_flatquant_recipe_is_flatquants_own_configuration():
    exp = config.build_experiment(compose_config("transform=flatquant_recipe"))
    calib, optim = exp.calib, exp.optim
    assert (calib.mode, calib.objective, calib.layer_inputs) == ("layer_wise", "block_mse", "full_precision")
    assert (calib.epochs, calib.batch_size, calib.smooth_alpha, calib.reg_weight) == (15, 4, 0.3, 0.0)
    assert calib.learn_clipping and calib.quantize_weights
    assert (optim.name, optim.lr, optim.clip_lr, optim.grad_clip, optim.schedule) == ("adamw", 5e-3, 5e-2, None, "cosine")
    kron = {"family": "affine", "parametrization": "kronecker", "factor": "svd", "init": "random",
            "channel_scales": True}
    assert exp.transform.active() == {
        "pre_linear": kron, "down_proj": kron,
        "attn_vo": {"family": "affine", "parametrization": "svd", "init": "random"},
    }
    assert not exp.transform.fold_norms


def test_the_seed_reaches_the_transforms():
    assert config.build_experiment(compose_config("seed=3")).transform.seed == 3


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("quant.weight_format=mxfp3", "quant: .*mxfp3"),
        ("quant.weight_quantizer=awq", "quant: .*awq"),
        ("+quant.group_size=128", "quant: unknown key.*group_size"),
        ("transform.placements.residual.family=spin", "transform: .*spin"),
        ("eval.suite=helm", "eval.suite='helm'"),
        ("eval.ppl_datasets=[heldout,wikitext3]", "eval.ppl_datasets: unknown .*wikitext3"),
        ("logger.mode=cloud", "logger.mode='cloud'"),
        ("model.dtype=int4", "model.dtype='int4'"),
        ("device=tpu9", "device='tpu9'"),
        ("+optim.momentum=0.9", "optim.momentum is not used by adamw"),
        ("gptq.damp=0", "gptq.damp must be positive"),
        ("+logger.backend=wandb", "logger: unknown key.*backend"),
        ("model=tiny_outliers model.outliers.points=[residual]", "model.outliers.points: unknown"),
        ("seed=-1", r"^seed=-1 is not a seed; use an integer from 0 to 4294967295$"),
        ("seed=4294967296", "seed=4294967296 is not a seed"),
        ("calib.seed=-3", r"^calib: calib.seed=-3 is not a seed"),
        ("+foo=1", r"^unknown top-level key\(s\) foo: nothing reads them \(they would only change the run id\)"),
        ("eval.limit=0", r"^eval: eval.limit must be an integer >= 1 or null \(all\), got 0$"),
        ("eval.max_seq_len=0", r"^eval: eval.max_seq_len must be an integer >= 1, got 0$"),
        ("calib.checkpoint_minutes=0", r"^calib: calib.checkpoint_minutes must be > 0 or null"),
        ("calib.path=data/text/calibration.txt calib.source=wikitext2",
         r"^calib: calib.path is the text of calib.source=local, but calib.source=wikitext2"),
        ("calib.path=no/such/text.txt", r"^calib.path=no/such/text.txt: no such file; set calib.path to a text file"),
        ("model.name_or_path=/no/such/model", r"^model.name_or_path=/no/such/model: no such directory"),
        ("model.name_or_path=models/no-such-model", r"^model.name_or_path=models/no-such-model: no such directory"),
        ("model.name_or_path=./gpt2", r"^model.name_or_path=./gpt2: no such directory"),
        ("transform=spinquant optim=adamw",
         r"^placement residual learns its rotation matrix itself \(parametrization: stiefel\), which only Cayley "
         r"SGD keeps orthogonal, but optim=adamw; add optim=cayley_sgd"),
        ("transform=rotation +transform.placements.residual.parametrization=qr",
         r"placement residual: parametrization='qr' is not supported; choose one of exp, stiefel"),
    ],
)
def test_bad_values_raise_one_config_error_naming_the_key(override, message):
    with pytest.raises(config.ConfigError, match=message):
        config.build_experiment(compose_config(*override.split()))


def test_a_hub_id_stays_a_hub_id_and_a_calibration_text_is_made_absolute():
    exp = config.build_experiment(compose_config("model.name_or_path=org/some-model", "calib.path=data/text/heldout.txt"))
    assert exp.model.name_or_path == "org/some-model"
    assert exp.calib.path == str(ROOT / "data" / "text" / "heldout.txt")
    assert exp.calib.checkpoint_minutes == 5 and exp.calib.keep_checkpoints is False and exp.wait is False


def test_a_text_path_is_one_run_however_it_is_spelled(tmp_path, monkeypatch):
    text = ROOT / "data" / "text" / "heldout.txt"

    def identity(path: str) -> dict:
        return config.identity_config(compose_config(f"calib.path={path}", f"eval.ppl_datasets=[heldout,{path}]"))

    spelled = [identity(p) for p in ("data/text/heldout.txt", "./data/text/heldout.txt", str(text))]
    monkeypatch.chdir(ROOT / "data")
    spelled.append(identity("text/heldout.txt"))
    assert {record.run_id(i) for i in spelled} == {record.run_id(spelled[0])}
    # Relative to the project: the same id in every clone of it.
    assert spelled[0]["calib"]["path"] == "data/text/heldout.txt"
    assert spelled[0]["eval"]["ppl_datasets"] == ["heldout", "data/text/heldout.txt"]

    outside = tmp_path / "mine.txt"
    outside.write_text("text")
    assert identity(str(outside))["calib"]["path"] == str(outside.resolve())


def test_the_shipped_configs_keep_their_run_ids():
    for cfg in (compose_config(), compose_config(defaults=True), compose_config("model.name_or_path=org/some-model")):
        assert config.identity_config(cfg) == OmegaConf.to_container(cfg, resolve=True)


def test_spinquant_learns_the_rotations_themselves_with_its_own_optimizer():
    exp = config.build_experiment(compose_config("transform=spinquant"))
    assert (exp.optim.name, exp.optim.lr, exp.optim.momentum) == ("cayley_sgd", 1.5, 0.0)
    assert exp.calib.objective == "ce"  # SpinQuant's loss: the calibration text's own next tokens
    rotation = config.build_experiment(compose_config("transform=rotation")).transform.placements
    for name in ("residual", "attn_vo"):
        assert exp.transform.placements[name] == {**rotation[name], "parametrization": "stiefel"}
    assert exp.transform.placements["down_proj"] == rotation["down_proj"]


@pytest.mark.parametrize("objective", ["kl", "ce"])
def test_a_whole_model_objective_is_refused_layer_wise_with_what_to_change(objective):
    with pytest.raises(config.ConfigError, match=rf"^calib: objective {objective} needs the whole model; use mode=end_to_end"):
        config.build_experiment(compose_config("calib.mode=layer_wise", f"calib.objective={objective}"))


def test_the_bound_objective_without_quantized_activations_is_rejected():
    with pytest.raises(config.ConfigError, match=r"quant\.act_format is null"):
        config.build_experiment(compose_config("quant=none", "calib.objective=bound"))


def test_a_block_size_that_does_not_divide_the_hidden_size_is_rejected_before_loading():
    exp = config.build_experiment(compose_config("quant.block_size=24"))
    model_config = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4)
    with pytest.raises(config.ConfigError, match="block size 24 does not divide the model's hidden_size=64"):
        exp.quant.check_dimensions(*model_dimensions(model_config))


def test_a_kv_block_size_that_does_not_divide_head_dim_is_rejected_before_loading():
    exp = config.build_experiment(compose_config("quant.kv_format=mxfp4", "quant.block_size=16"))
    model_config = LlamaConfig(hidden_size=96, intermediate_size=128, num_attention_heads=4)  # head_dim 24
    with pytest.raises(config.ConfigError, match="kv block size 16 does not divide the model's head_dim=24"):
        exp.quant.check_dimensions(*model_dimensions(model_config))


def test_the_transform_families_table_is_what_the_transform_classes_accept():
    assert set(TRANSFORM_FAMILIES) == set(TRANSFORMS)
    for family, accepted in TRANSFORM_FAMILIES.items():
        assert accepted == transform_kwargs(family), family


def test_the_settings_and_the_config_import_no_torch():
    code = "import sys, latmix.config; sys.exit(any(m.split('.')[0] in ('torch', 'transformers') for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=60).returncode == 0


def run_cli(*overrides: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return run_script("run.py", *on_tiny(overrides), timeout=120, env=env)


@pytest.mark.parametrize(("group", "option"), [("model", "gpt5"), ("quant", "mxfp3"), ("transform", "spin")])
def test_an_unknown_option_fails_with_the_available_options_and_no_traceback(group, option):
    out = run_cli(f"{group}={option}")
    assert out.returncode != 0
    assert f"Could not find '{group}/{option}'" in out.stderr
    assert "Available options" in out.stderr and "Traceback" not in out.stderr


def test_a_bad_value_fails_with_one_line_before_torch_is_imported(tmp_path):
    out = run_cli("quant.weight_format=bogus", "logger=none", f"hydra.run.dir={tmp_path}/out",
                  env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error: quant: unknown MX format 'bogus'")
    assert "Traceback" not in out.stderr
    imported = [line.split("|")[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time:")]
    assert imported and not any(name.split(".")[0] in ("torch", "transformers") for name in imported)


def test_a_hub_model_without_network_fails_with_one_line_saying_what_to_do(tmp_path):
    out = run_cli("model=llama3-8b", f"paths.results_dir={tmp_path}", f"hydra.run.dir={tmp_path}/out")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "model.name_or_path='meta-llama/Meta-Llama-3-8B' is not a local directory" in out.stderr
    assert "(hf download meta-llama/Meta-Llama-3-8B --local-dir DIR) and pass model.name_or_path=DIR" in out.stderr
    assert "huggingface-cli" not in out.stderr


def test_a_bad_block_size_fails_on_the_command_line_with_one_line(tmp_path):
    LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4).save_pretrained(tmp_path / "m")
    out = run_cli(f"model.name_or_path={tmp_path / 'm'}", "quant.block_size=24",
                  f"paths.results_dir={tmp_path}", f"hydra.run.dir={tmp_path}/out")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "does not divide the model's hidden_size=64" in out.stderr


def test_a_transform_the_model_cannot_take_fails_with_one_line_naming_the_transform(tmp_path):
    out = run_cli("transform=block_hadamard", "transform.placements.pre_linear.block_size=48",
                  f"paths.results_dir={tmp_path}", f"hydra.run.dir={tmp_path}/out", "logger=none")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "error: transform=block_hadamard on this model: block_hadamard block_size=48 must divide" in out.stderr
