"""Train the embedded tiny Llama and its byte-level BPE tokenizer on the corpus of build_corpus.py.

The model is a real transformers LlamaForCausalLM (RMSNorm, SwiGLU, RoPE, GQA, untied embeddings) at
a laptop size. Training runs on CPU under a hard wall-clock budget: the cosine learning-rate schedule
is driven by progress = max(step / planned_steps, elapsed / budget), where planned_steps comes from a
short throughput probe, so the schedule always ends inside the budget even when the machine slows
down. The saved folder (bf16 safetensors, tokenizer, generation config, training_log.json,
README.md, MANIFEST.json) loads with `from_pretrained(path)` offline. The training state is
checkpointed every few minutes to --checkpoint; a run started while that file exists resumes from it
(its tokenizer, step and schedule) instead of starting over.

    python scripts/train_tiny_model.py --corpus /tmp/latmix-corpus/corpus --max-minutes 35
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

REPO = Path(__file__).resolve().parents[1]
SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
# The two Bible translations are half the training text; capping each keeps prose and verse in balance.
BIBLE_CHAR_CAP = 2_000_000
# Validation costs a few seconds per run and a checkpoint a full state dump: do both every few minutes.
VALIDATION_SECONDS = 240.0
CHECKPOINT_SECONDS = 300.0


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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
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
    return parser.parse_args(argv)


def logged_args(args: argparse.Namespace) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


@dataclass
class Data:
    tokenizer: PreTrainedTokenizerFast
    train_ids: torch.Tensor
    val_windows: torch.Tensor


@dataclass
class Progress:
    """Where the schedule stands; saved in the checkpoint so that a resumed run continues it."""

    step: int = 0
    # None until the throughput probe has run.
    planned_steps: int | None = None
    # Seconds of training so far, over all runs of a resumed training.
    elapsed: float = 0.0

    def fraction(self, budget: float) -> float:
        """How far the schedule is: whichever of steps and wall clock is further along."""
        return max(self.step / self.planned_steps if self.planned_steps else 0.0, self.elapsed / budget)


@dataclass
class ThroughputProbe:
    """Seconds per step, timed between steps `first` and `last`: the first steps pay one-time allocation costs."""

    first: int = 5
    last: int = 15
    started: float | None = None

    def seconds_per_step(self, step: int, elapsed: float) -> float | None:
        """None until step `last`; called before every step with the training time so far."""
        if step == self.first:
            self.started = elapsed
        if step == self.last:
            return (elapsed - self.started) / (self.last - self.first)
        return None


def load_checkpoint(path: Path) -> dict | None:
    return torch.load(path, weights_only=True) if path.exists() else None


def tokenizer_for(checkpoint: dict | None, train_texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """The checkpoint's tokenizer when resuming, else one trained on the train split."""
    # BPE training is deterministic, but a resumed run reuses the saved tokenizer rather than rely on it.
    if checkpoint is not None and "tokenizer" in checkpoint:
        return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(checkpoint["tokenizer"]),
                                       model_max_length=512, **SPECIAL_TOKENS)
    return train_tokenizer(train_texts, vocab_size)


def load_data(corpus: Path, checkpoint: dict | None, vocab_size: int, seq_len: int) -> Data:
    train_texts = read_split(corpus, "train")
    tokenizer = tokenizer_for(checkpoint, train_texts, vocab_size)
    val_ids = token_stream(tokenizer, read_split(corpus, "validation"))
    return Data(tokenizer, token_stream(tokenizer, train_texts), eval_windows(val_ids, seq_len, n_windows=48))


def measure_baselines(model: LlamaForCausalLM, data: Data) -> dict[str, float]:
    """The perplexities the trained model is judged against (the model must still be untrained)."""
    return {
        "untrained_val_ppl": perplexity(model, data.val_windows),
        "unigram_val_ppl": unigram_perplexity(data.train_ids, data.val_windows.flatten(), len(data.tokenizer)),
    }


def make_optimizer(model: LlamaForCausalLM, lr: float) -> torch.optim.AdamW:
    """AdamW that decays the matrices only: norm gains are not shrunk towards zero."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95), fused=False)


def new_log(args: argparse.Namespace, model: LlamaForCausalLM, data: Data, baselines: dict[str, float],
            device: torch.device) -> dict:
    return {"args": logged_args(args), "config": model.config.to_dict(),
            "n_params": sum(p.numel() for p in model.parameters()),
            "baselines": baselines, "train_tokens": data.train_ids.numel(), "val_tokens": data.val_windows.numel(),
            "env": {"torch": torch.__version__, "transformers": transformers.__version__,
                    "machine": platform.machine(), "threads": args.threads, "device": str(device)},
            "curve": [], "val": []}


def resume(checkpoint: dict, args: argparse.Namespace, model: LlamaForCausalLM, optimizer: torch.optim.Optimizer,
           generator: torch.Generator) -> tuple[dict, Progress]:
    """Restores model, optimizer and sampler in place; returns the checkpoint's log and progress."""
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    generator.set_state(checkpoint["generator"])
    progress = Progress(checkpoint["step"], checkpoint["planned_steps"], checkpoint["elapsed"])
    log = json.loads(checkpoint["log"])
    # A resumed run may change the budget; the log keeps the arguments in force at the end.
    log["resumed"] = [*log.get("resumed", []), {"step": progress.step, "args": log["args"]}]
    log["args"] = logged_args(args)
    print(f"resumed at step {progress.step}", flush=True)
    return log, progress


def write_checkpoint(path: Path, model: LlamaForCausalLM, optimizer: torch.optim.Optimizer,
                     generator: torch.Generator, data: Data, progress: Progress, log: dict) -> None:
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "generator": generator.get_state(), "step": progress.step, "planned_steps": progress.planned_steps,
                "elapsed": progress.elapsed, "log": json.dumps(log),
                "tokenizer": data.tokenizer.backend_tokenizer.to_str()}, path)


def optimizer_step(model: LlamaForCausalLM, optimizer: torch.optim.Optimizer, batch: torch.Tensor,
                   lr: float) -> float:
    """One clipped AdamW step at learning rate `lr`; returns the batch loss."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss = model(input_ids=batch, labels=batch).loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss.item()


def train(model: LlamaForCausalLM, optimizer: torch.optim.Optimizer, generator: torch.Generator, data: Data,
          args: argparse.Namespace, log: dict, progress: Progress) -> None:
    """Trains until the schedule ends, updating `progress` and `log` and checkpointing on the way."""
    budget = args.max_minutes * 60.0
    start = time.time() - progress.elapsed
    last_ckpt = last_val = time.time()
    probe = ThroughputProbe()
    model.train()
    while True:
        progress.elapsed = time.time() - start
        if progress.planned_steps is None:
            seconds_per_step = probe.seconds_per_step(progress.step, progress.elapsed)
            if seconds_per_step is not None:
                # Keep 5% of the budget for the final evaluation and saving.
                progress.planned_steps = log["planned_steps"] = int(0.95 * budget / seconds_per_step)
                print(f"planned {progress.planned_steps} steps ({seconds_per_step:.2f}s/step)", flush=True)
        fraction = progress.fraction(budget)
        if fraction >= 1.0:
            break
        lr = learning_rate(fraction, args.lr, warmup=0.03, floor=0.05)
        batch = sample_batch(data.train_ids, args.batch_size, args.seq_len, generator).to(model.device)
        loss = optimizer_step(model, optimizer, batch, lr)
        progress.step += 1
        minutes = round(progress.elapsed / 60, 2)
        if progress.step % 10 == 0:
            log["curve"].append({"step": progress.step, "minutes": minutes, "lr": lr, "loss": round(loss, 4)})
            print(f"step {progress.step} {progress.elapsed / 60:.1f}min lr {lr:.2e} loss {loss:.3f}", flush=True)
        if time.time() - last_val > VALIDATION_SECONDS:
            log["val"].append({"step": progress.step, "minutes": minutes,
                               "val_ppl": perplexity(model, data.val_windows)})
            print(log["val"][-1], flush=True)
            last_val = time.time()
        if time.time() - last_ckpt > CHECKPOINT_SECONDS:
            progress.elapsed = time.time() - start
            write_checkpoint(args.checkpoint, model, optimizer, generator, data, progress, log)
            last_ckpt = time.time()
    progress.elapsed = time.time() - start


def finish(model: LlamaForCausalLM, data: Data, args: argparse.Namespace, log: dict, progress: Progress) -> None:
    """Evaluates the model as it is shipped (bf16) and saves it with its log, card and manifest to args.out."""
    model.to(torch.bfloat16)
    log["final"] = {"steps": progress.step, "minutes": round(progress.elapsed / 60, 2),
                    "tokens_seen": progress.step * args.batch_size * args.seq_len,
                    "val_ppl": perplexity(model, data.val_windows), "dtype": "bfloat16"}
    print(log["final"], flush=True)
    save(model, data.tokenizer, args.out, log)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    t0 = time.time()
    checkpoint = load_checkpoint(args.checkpoint)
    data = load_data(args.corpus, checkpoint, args.vocab_size, args.seq_len)
    print(f"tokenizer + data: {time.time() - t0:.0f}s, {data.train_ids.numel() / 1e6:.2f}M train tokens", flush=True)

    model = LlamaForCausalLM(model_config(data.tokenizer, args.layers, args.seq_len)).to(device)
    optimizer = make_optimizer(model, args.lr)
    generator = torch.Generator().manual_seed(args.seed)
    if checkpoint is None:
        baselines = measure_baselines(model, data)
        print(baselines, flush=True)
        log, progress = new_log(args, model, data, baselines, device), Progress()
    else:
        log, progress = resume(checkpoint, args, model, optimizer, generator)
    train(model, optimizer, generator, data, args, log, progress)
    finish(model, data, args, log, progress)


if __name__ == "__main__":
    main()
