"""Shared builders and fixtures: tiny random Llama-family models and checkpoints (no download).

`make_tiny_model(name, seed=0)` builds one of TINY_CONFIGS in float32, eval mode, with randomized
RMSNorm weights and biases (so norm folding and bias handling are exercised, not hidden by ones/zeros).
head_dim is 32 everywhere so that per-head MX blocks of 32 fit.

`relative_error`, `perturb_learnable_transforms` and the `one_thread` fixture serve the tests of
function preservation; `load_script(name)` imports a file of scripts/ as a module, and
`run_script(path, *args)` runs one (run.py included) as a user would, offline.

`build_tiny_checkpoint(path)` saves a random tiny Llama (or a given model) with a byte-level BPE
tokenizer trained on the local text, as a hub model is saved: what run.py and load_model read.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from latmix import local_tasks

_COMMON = dict(
    vocab_size=128,
    num_hidden_layers=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
)

TINY_CONFIGS: dict[str, Callable[[], object]] = {
    "llama": lambda: LlamaConfig(
        **_COMMON, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, tie_word_embeddings=False,
    ),
    "llama_tied": lambda: LlamaConfig(
        **_COMMON, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, tie_word_embeddings=True,
    ),
    "qwen2": lambda: Qwen2Config(
        **_COMMON, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, tie_word_embeddings=False,
    ),
    "mistral": lambda: MistralConfig(
        **_COMMON, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, tie_word_embeddings=False, sliding_window=None,
    ),
    # hidden 96 = 12 * 8 and intermediate 160 = 20 * 8: Hadamard sizes that are not powers of two.
    "llama_96": lambda: LlamaConfig(
        **_COMMON, hidden_size=96, intermediate_size=160, num_attention_heads=3, num_key_value_heads=1,
        head_dim=32, tie_word_embeddings=False,
    ),
}


ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str) -> ModuleType:
    """scripts/<name>.py as a module (registered in sys.modules, so its dataclasses resolve)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def run_script(path: str, *args: str, timeout: int = 900,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Runs ROOT/<path> in a fresh interpreter, offline (no hub, W&B offline without a key), as a user would."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", **(env or {})}
    env.pop("WANDB_API_KEY", None)
    return subprocess.run([sys.executable, str(ROOT / path), *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=timeout)


def relative_error(logits: torch.Tensor, reference: torch.Tensor) -> float:
    return float((logits - reference).abs().max() / reference.abs().max())


def perturb_learnable_transforms(prepared, scale: float = 0.02) -> None:
    """Move every trainable transform parameter off its initialization (a generic, non-trivial point)."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for transform in prepared.transforms.values():
            for param in transform.parameters():
                if param.requires_grad:
                    param.add_(scale * torch.randn(param.shape, generator=generator))


@pytest.fixture
def one_thread():
    """One intra-op thread: the tiny models are latency-bound, extra threads only contend on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@torch.no_grad()
def build_tiny_model(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS[name](), dtype=torch.float32)
    for param_name, param in model.named_parameters():
        if "norm" in param_name:
            param.copy_(1.0 + 0.2 * torch.randn_like(param))
        elif param_name.endswith("bias"):
            param.copy_(0.1 * torch.randn_like(param))
    return model.eval()


@pytest.fixture
def make_tiny_model() -> Callable[..., torch.nn.Module]:
    return build_tiny_model


@pytest.fixture
def tiny_llama() -> torch.nn.Module:
    return build_tiny_model("llama")


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))


CHECKPOINT_VOCAB = 384


def build_tiny_checkpoint(path: Path, seed: int = 0, model: torch.nn.Module | None = None) -> Path:
    """A random tiny Llama (or `model`) and a byte-level BPE tokenizer trained on the local text, saved like a hub model."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=CHECKPOINT_VOCAB,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train([str(local_tasks.text_path("heldout"))], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>").save_pretrained(path)
    if model is None:
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=CHECKPOINT_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
            bos_token_id=0, eos_token_id=1, tie_word_embeddings=False,
        )
        model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama"))
