"""Build the local evaluation tasks (lm-eval yaml + jsonl) from the held-out works of the corpus.

All items come from the test split of scripts/build_corpus.py (Austen's Persuasion, Shakespeare's
Hamlet and Twelfth Night), which the tiny model never saw. Each task has the shape of a task in the
usual zero-shot suite so the same lm-eval code path runs:

    tiny_lambada    LAMBADA-like: predict the last word of a passage (loglikelihood; acc, perplexity).
                    Only passages whose last word already occurs earlier in the passage are kept, so the
                    word is predictable from context, as in LAMBADA.
    tiny_hellaswag  HellaSwag-like: pick the true next sentence among 4; the 3 distractors are sentences
                    of similar length from other passages of the same work (acc, acc_norm).
    tiny_wordorder  BLiMP-like minimal pairs: the original sentence vs the same sentence with two
                    adjacent words swapped, scored without context (acc; chance 0.5).

Items are sampled with a fixed seed, so a rebuild reproduces the files byte for byte. The yaml files
name their jsonl relative to their own folder; latmix.local_tasks.materialize_local_tasks() writes
the absolute-path copies lm-eval needs. The script ends by refreshing the "files" section of
data/MANIFEST.json (sha256 of every shipped file under data/).

    python scripts/build_tasks.py --corpus /tmp/latmix-corpus/corpus
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"
TEST_WORKS = ("austen_persuasion", "shakespeare_hamlet", "shakespeare_twelfth_night")
ITEMS_PER_TASK = 300

SPEAKER_TAG = re.compile(r"^[A-Z][A-Za-z'\- ]{0,30}\.$")  # "SIR TOBY." or "Ham." opening a speech
STAGE_DIRECTION = re.compile(r"\[[^\]]*\]")
HEADING = re.compile(r"^(CHAPTER|ACT|SCENE|Scene|Act)\b|^[A-Z0-9 ,.'\-]+$")
SENTENCE_END = re.compile(r"(?<=[.!?])[\"']?\s+(?=[\"']?[A-Z])")
WORD = re.compile(r"^[A-Za-z]+$")

TASK_YAML = {
    "tiny_lambada": """\
task: tiny_lambada
dataset_path: json
dataset_kwargs:
  data_files:
    test: tiny_lambada.jsonl
output_type: loglikelihood
test_split: test
doc_to_text: "{{context}}"
doc_to_target: "{{' ' + target}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""",
    "tiny_hellaswag": """\
task: tiny_hellaswag
dataset_path: json
dataset_kwargs:
  data_files:
    test: tiny_hellaswag.jsonl
output_type: multiple_choice
test_split: test
doc_to_text: "{{ctx}}"
doc_to_target: "{{label}}"
doc_to_choice: "endings"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""",
    "tiny_wordorder": """\
task: tiny_wordorder
dataset_path: json
dataset_kwargs:
  data_files:
    test: tiny_wordorder.jsonl
output_type: multiple_choice
test_split: test
doc_to_text: ""
doc_to_target: "{{label}}"
doc_to_choice: "{{[sentence_a, sentence_b]}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""",
}


def passages(text: str) -> list[str]:
    """Paragraphs of prose, or speeches of a play, as single lines without speaker tags or stage directions."""
    result = []
    for block in text.split("\n\n"):
        lines = [line.strip() for line in STAGE_DIRECTION.sub("", block).split("\n")]
        if lines and SPEAKER_TAG.match(lines[0]) and len(lines) > 1:
            lines = lines[1:]
        lines = [line for line in lines if line and not HEADING.match(line)]
        passage = " ".join(" ".join(lines).split())
        if passage:
            result.append(passage)
    return result


def sentences(passage: str) -> list[str]:
    return [s.strip() for s in SENTENCE_END.split(passage) if s.strip()]


def bare(word: str) -> str:
    return word.strip(".,;:!?\"'()-_").lower()


def lambada_items(work_passages: list[str]) -> list[dict]:
    """One candidate per sentence: its last word, given that sentence and the whole sentences before it.

    The context reaches back over passage breaks to 30-90 words; the target must be a word of 3+
    letters that already occurs in the context, so it is predictable from the passage, as in LAMBADA.
    """
    flat = [s for p in work_passages for s in sentences(p)]
    items = []
    for i, sentence in enumerate(flat):
        words = sentence.split()
        target = words[-1].rstrip(".!?\"'")
        if not sentence.endswith((".", "!", "?")) or not WORD.match(target) or len(target) < 3 or len(words) < 4:
            continue
        context_words = words[:-1]
        for previous in reversed(flat[max(0, i - 10) : i]):
            if len(context_words) >= 30:
                break
            context_words = previous.split() + context_words
        if not 30 <= len(context_words) <= 90 or target.lower() not in {bare(w) for w in context_words}:
            continue
        items.append({"context": " ".join(context_words), "target": target})
    return items


def hellaswag_items(work_passages: list[str], rng: random.Random) -> list[dict]:
    by_passage = [sentences(p) for p in work_passages]
    pool = [(i, s) for i, ss in enumerate(by_passage) for s in ss if 6 <= len(s.split()) <= 30]
    items = []
    for i, ss in enumerate(by_passage):
        for j in range(len(ss) - 1):
            ctx, ending = ss[j], ss[j + 1]
            if not (6 <= len(ctx.split()) <= 40 and 6 <= len(ending.split()) <= 30):
                continue
            # Distractors of similar length, so acc cannot be won by preferring short or long endings.
            similar = [s for k, s in pool if k != i and 0.67 <= len(s) / len(ending) <= 1.5 and s != ending]
            if len(similar) < 3:
                continue
            endings = [ending, *rng.sample(similar, 3)]
            rng.shuffle(endings)
            items.append({"ctx": ctx, "endings": endings, "label": endings.index(ending)})
    return items


def wordorder_item(sentence: str, rng: random.Random) -> dict | None:
    words = sentence.split()
    if not 8 <= len(words) <= 30:
        return None
    # Swap two adjacent, different, purely alphabetic words inside the sentence.
    candidates = [i for i in range(1, len(words) - 2)
                  if WORD.match(words[i]) and WORD.match(words[i + 1]) and words[i].lower() != words[i + 1].lower()]
    if not candidates:
        return None
    i = rng.choice(candidates)
    swapped = [*words[:i], words[i + 1], words[i], *words[i + 2 :]]
    pair = [sentence, " ".join(swapped)]
    label = rng.randrange(2)
    if label == 1:
        pair.reverse()
    return {"sentence_a": pair[0], "sentence_b": pair[1], "label": label}


def build_items(corpus: Path, seed: int) -> dict[str, list[dict]]:
    works = {name: passages((corpus / "test" / f"{name}.txt").read_text()) for name in TEST_WORKS}
    rng = random.Random(seed)
    lambada = [dict(item, work=name) for name, ps in works.items() for item in lambada_items(ps)]
    hellaswag = [dict(item, work=name) for name, ps in works.items() for item in hellaswag_items(ps, rng)]
    wordorder = [dict(item, work=name) for name, ps in works.items() for p in ps for s in sentences(p)
                 if (item := wordorder_item(s, rng))]
    return {name: sample(items, ITEMS_PER_TASK, rng, name)
            for name, items in (("tiny_lambada", lambada), ("tiny_hellaswag", hellaswag), ("tiny_wordorder", wordorder))}


def sample(items: list[dict], n: int, rng: random.Random, task: str) -> list[dict]:
    if len(items) < n:
        raise ValueError(f"{task}: only {len(items)} candidate items, need {n}; lower ITEMS_PER_TASK")
    return [dict(item, id=i) for i, item in enumerate(rng.sample(items, n))]


def write_task(name: str, items: list[dict]) -> None:
    folder = DATA / "tasks" / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.yaml").write_text(TASK_YAML[name])
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items))


def shipped_files(root: Path, keep: Callable[[Path], bool]) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and keep(p)}


def refresh_manifest() -> None:
    path = DATA / "MANIFEST.json"
    manifest = json.loads(path.read_text()) if path.exists() else {}
    manifest["files"] = shipped_files(DATA, keep=lambda p: p.name != "MANIFEST.json")
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=Path("/tmp/latmix-corpus/corpus"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for name, items in build_items(args.corpus, args.seed).items():
        write_task(name, items)
        print(f"{name}: {len(items)} items")
    refresh_manifest()


if __name__ == "__main__":
    main()
