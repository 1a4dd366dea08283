"""Train the embedded tiny Llama and its byte-level BPE tokenizer on the corpus of build_corpus.py.

The model is a real transformers LlamaForCausalLM (RMSNorm, SwiGLU, RoPE, GQA, untied embeddings) at
a laptop size. Training runs on CPU under a hard wall-clock budget: the cosine learning-rate schedule
is driven by progress = max(step / planned_steps, elapsed / budget), where planned_steps comes from a
short throughput probe, so the schedule always ends inside the budget even when the machine slows
down. The saved folder (bf16 safetensors, tokenizer, generation config, training_log.json,
README.md) loads with `from_pretrained(path)` offline.

    python scripts/train_tiny_model.py --corpus /tmp/latmix-corpus/corpus --max-minutes 35
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import time
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

REPO = Path(__file__).resolve().parents[1]
SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
# The two Bible translations are half the training text; capping each keeps prose and verse in balance.
BIBLE_CHAR_CAP = 2_000_000


def model_config(tokenizer: PreTrainedTokenizerFast, num_layers: int, seq_len: int) -> LlamaConfig:
    """The fixed shape other parts of latmix rely on (d_ff = 3 * 256 exercises non-power-of-two Hadamards)."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=seq_len,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def read_split(corpus: Path, split: str) -> list[str]:
    texts = []
    for path in sorted((corpus / split).glob("*.txt")):
        text = path.read_text()
        texts.append(text[:BIBLE_CHAR_CAP] if path.stem.startswith("bible_") else text)
    if not texts:
        raise ValueError(f"no {split} texts under {corpus}/{split}: run scripts/build_corpus.py first")
    return texts


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style): every string is encodable, no unknown token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=512, **SPECIAL_TOKENS)


def token_stream(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> torch.Tensor:
    """All works as one stream of ids, each work closed by EOS."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def unigram_perplexity(train_ids: torch.Tensor, eval_ids: torch.Tensor, vocab_size: int) -> float:
    """Perplexity of add-one-smoothed token frequencies: the bar a language model must clear."""
    counts = torch.bincount(train_ids, minlength=vocab_size).double() + 1.0
    log_probs = (counts / counts.sum()).log()
    return math.exp(-log_probs[eval_ids].mean().item())


def eval_windows(ids: torch.Tensor, seq_len: int, n_windows: int) -> torch.Tensor:
    """Evenly spaced, non-overlapping windows: deterministic, covering the whole split."""
    n_total = ids.numel() // seq_len
    picks = torch.linspace(0, n_total - 1, min(n_windows, n_total)).long()
    return torch.stack([ids[i * seq_len : (i + 1) * seq_len] for i in picks.tolist()])


@torch.no_grad()
def perplexity(model: LlamaForCausalLM, windows: torch.Tensor, batch_size: int = 8) -> float:
    model.eval()
    total, count = 0.0, 0
    for batch in windows.split(batch_size):
        batch = batch.to(model.device)
        loss = model(input_ids=batch, labels=batch).loss
        total += loss.item() * batch.numel()
        count += batch.numel()
    model.train()
    return math.exp(total / count)


def sample_batch(ids: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, ids.numel() - seq_len, (batch_size,), generator=generator)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


def learning_rate(progress: float, peak: float, warmup: float, floor: float) -> float:
    """Linear warmup over the first `warmup` fraction, then cosine down to floor * peak at progress 1."""
    if progress < warmup:
        return peak * progress / warmup
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, (progress - warmup) / (1.0 - warmup))))
    return peak * (floor + (1.0 - floor) * cosine)


def write_model_card(out: Path, log: dict) -> None:
    final = log["final"]
    card = f"""# tiny-llama (latmix embedded model)

A {log['n_params'] / 1e6:.1f}M-parameter LlamaForCausalLM trained from scratch by `scripts/train_tiny_model.py`
on public-domain English (Austen, Shakespeare, Milton, KJV and World English Bibles; see
`data/MANIFEST.json`), so that latmix runs end to end on a laptop with a model that has learned
something. It is a test article for quantization research, not a useful language model.

Architecture: hidden 256, intermediate 768 (SwiGLU), {log['config']['num_hidden_layers']} layers,
4 heads of dim 64, 2 KV heads (GQA), RoPE theta 10000, RMSNorm eps 1e-5, untied embeddings,
vocab {log['config']['vocab_size']} (byte-level BPE), context 512. Weights stored in bfloat16.

Training: {final['steps']} steps of {log['args']['batch_size']} x {log['args']['seq_len']} tokens
({final['tokens_seen'] / 1e6:.1f}M tokens) in {final['minutes']:.1f} minutes on CPU, AdamW, cosine schedule, seed
{log['args']['seed']}.

| validation perplexity (Northanger Abbey + Macbeth, 512-token windows) | |
|---|---|
| untrained (same architecture, same seed) | {log['baselines']['untrained_val_ppl']:.1f} |
| unigram token frequencies | {log['baselines']['unigram_val_ppl']:.1f} |
| this model | {final['val_ppl']:.2f} |

Full curve: `training_log.json`. Rebuild: `docs/embedded.md`.
"""
    (out / "README.md").write_text(card)


def write_model_manifest(out: Path) -> None:
    """MANIFEST.json: sha256 of every file in the model folder, so tests can tell a changed model."""
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(out.iterdir()) if p.is_file() and p.name != "MANIFEST.json"}
    (out / "MANIFEST.json").write_text(json.dumps({"files": files}, indent=2) + "\n")


def save(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, out: Path, log: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "training_log.json").write_text(json.dumps(log, indent=1) + "\n")
    write_model_card(out, log)
    write_model_manifest(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=Path("/tmp/latmix-corpus/corpus"))
    parser.add_argument("--out", type=Path, default=REPO / "models" / "tiny-llama")
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/latmix-tiny-ckpt.pt"),
                        help="resumable training state, written every few minutes (not shipped)")
    parser.add_argument("--max-minutes", type=float, default=35.0, help="hard wall-clock budget for training")
    parser.add_argument("--layers", type=int, default=4, choices=(4, 6))
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    t0 = time.time()
    state = torch.load(args.checkpoint, weights_only=True) if args.checkpoint.exists() else None
    train_texts = read_split(args.corpus, "train")
    # BPE training is deterministic, but a resumed run reuses the saved tokenizer rather than rely on it.
    if state is not None and "tokenizer" in state:
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(state["tokenizer"]),
                                            model_max_length=512, **SPECIAL_TOKENS)
    else:
        tokenizer = train_tokenizer(train_texts, args.vocab_size)
    train_ids = token_stream(tokenizer, train_texts)
    val_ids = token_stream(tokenizer, read_split(args.corpus, "validation"))
    val_windows = eval_windows(val_ids, args.seq_len, n_windows=48)
    print(f"tokenizer + data: {time.time() - t0:.0f}s, {train_ids.numel() / 1e6:.2f}M train tokens", flush=True)

    config = model_config(tokenizer, args.layers, args.seq_len)
    model = LlamaForCausalLM(config).to(device)
    baselines = None if state is not None else {
        "untrained_val_ppl": perplexity(model, val_windows),
        "unigram_val_ppl": unigram_perplexity(train_ids, val_windows.flatten(), len(tokenizer)),
    }
    print(baselines, flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.95), fused=False)
    generator = torch.Generator().manual_seed(args.seed)
    log = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
           "config": config.to_dict(), "n_params": sum(p.numel() for p in model.parameters()),
           "baselines": baselines, "train_tokens": train_ids.numel(), "val_tokens": val_windows.numel(),
           "env": {"torch": torch.__version__, "transformers": transformers.__version__,
                   "machine": platform.machine(), "threads": args.threads, "device": str(device)},
           "curve": [], "val": []}
    step, planned_steps, elapsed_before = 0, None, 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        step, planned_steps, elapsed_before = state["step"], state["planned_steps"], state["elapsed"]
        log = json.loads(state["log"])
        # A resumed run may change the budget; the log keeps the arguments in force at the end.
        log["resumed"] = [*log.get("resumed", []), {"step": step, "args": log["args"]}]
        log["args"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        print(f"resumed at step {step}", flush=True)

    budget = args.max_minutes * 60.0
    start = time.time() - elapsed_before
    last_ckpt = last_val = time.time()
    # Throughput is probed between steps 5 and 15: the first steps pay one-time allocation costs.
    probe_from, probe_to, probe_start = 5, 15, None
    model.train()
    while True:
        elapsed = time.time() - start
        if planned_steps is None and step == probe_from:
            probe_start = elapsed
        if planned_steps is None and step == probe_to:
            seconds_per_step = (elapsed - probe_start) / (probe_to - probe_from)
            # Keep 5% of the budget for the final evaluation and saving.
            planned_steps = int(0.95 * budget / seconds_per_step)
            log["planned_steps"] = planned_steps
            print(f"planned {planned_steps} steps ({seconds_per_step:.2f}s/step)", flush=True)
        progress = max(step / planned_steps if planned_steps else 0.0, elapsed / budget)
        if progress >= 1.0:
            break
        lr = learning_rate(progress, args.lr, warmup=0.03, floor=0.05)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = sample_batch(train_ids, args.batch_size, args.seq_len, generator).to(device)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        if step % 10 == 0:
            log["curve"].append({"step": step, "minutes": round(elapsed / 60, 2), "lr": lr, "loss": round(loss.item(), 4)})
            print(f"step {step} {elapsed / 60:.1f}min lr {lr:.2e} loss {loss.item():.3f}", flush=True)
        if time.time() - last_val > 240:
            log["val"].append({"step": step, "minutes": round(elapsed / 60, 2), "val_ppl": perplexity(model, val_windows)})
            print(log["val"][-1], flush=True)
            last_val = time.time()
        if time.time() - last_ckpt > 300:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "generator": generator.get_state(), "step": step, "planned_steps": planned_steps,
                        "elapsed": time.time() - start, "log": json.dumps(log),
                        "tokenizer": tokenizer.backend_tokenizer.to_str()}, args.checkpoint)
            last_ckpt = time.time()

    minutes = (time.time() - start) / 60
    model.to(torch.bfloat16)
    log["final"] = {"steps": step, "minutes": round(minutes, 2), "tokens_seen": step * args.batch_size * args.seq_len,
                    "val_ppl": perplexity(model, val_windows), "dtype": "bfloat16"}
    print(log["final"], flush=True)
    save(model, tokenizer, args.out, log)


if __name__ == "__main__":
    main()
