"""WordNet for METEOR without a download: build an nltk data folder from Debian's WordNet 3.0.

nltk's METEOR looks up synonyms in WordNet, which nltk normally downloads at run time; here nothing
outside the package registries can be reached. Debian's `wordnet-base` and `wordnet-sense-index`
ship WordNet 3.0 under /usr/share/wordnet, but nltk reads only files inside its data folders
(nltk 3.10 also refuses symbolic links that point outside), so the files are copied into
`<repo>/nltk_data/corpora/wordnet/`. nltk also opens `lexnames`, which Debian does not ship; it is
the fixed list of WordNet 3.0's 45 lexicographer files (see lexnames(5WN)), written here.

Debian rebuilds the database from Princeton's sources. Words, senses and glosses are those of
nltk's download, with two differences: the hypernym loop between restrain.v.01 and inhibit.v.04
is removed, and a stretch of verb synsets sits 18 bytes further on in data.verb, so their
`offset()` differs (restrain.v.01: 2422681 here, 2422663 in nltk's copy). METEOR compares lemma
names only, so its scores are the same.

Run `python -m dep_engine.wordnet` (setup.sh --dev does) to build the folder; running it again only
compares file sizes and times. Library code calls `ensure_wordnet()`, which also points nltk at it.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from .atomic import atomic_write

DEBIAN_WORDNET = Path("/usr/share/wordnet")
REPO_ROOT = Path(__file__).resolve().parent.parent
NLTK_DATA = REPO_ROOT / "nltk_data"
INSTALL_HINT = "install Debian's wordnet-base and wordnet-sense-index, or run bash setup.sh --dev"

#: The files nltk's WordNetCorpusReader opens (its `_FILES`), except `lexnames`, which is written.
COPIED_FILES = (
    "cntlist.rev", "index.sense",
    "index.adj", "index.adv", "index.noun", "index.verb",
    "data.adj", "data.adv", "data.noun", "data.verb",
    "adj.exc", "adv.exc", "noun.exc", "verb.exc",
)

#: WordNet 3.0's lexicographer files in file-number order, with their syntactic category
#: (1 noun, 2 verb, 3 adjective, 4 adverb), as listed in lexnames(5WN).
LEXNAMES = (
    ("adj.all", 3), ("adj.pert", 3), ("adv.all", 4), ("noun.Tops", 1), ("noun.act", 1),
    ("noun.animal", 1), ("noun.artifact", 1), ("noun.attribute", 1), ("noun.body", 1),
    ("noun.cognition", 1), ("noun.communication", 1), ("noun.event", 1), ("noun.feeling", 1),
    ("noun.food", 1), ("noun.group", 1), ("noun.location", 1), ("noun.motive", 1),
    ("noun.object", 1), ("noun.person", 1), ("noun.phenomenon", 1), ("noun.plant", 1),
    ("noun.possession", 1), ("noun.process", 1), ("noun.quantity", 1), ("noun.relation", 1),
    ("noun.shape", 1), ("noun.state", 1), ("noun.substance", 1), ("noun.time", 1),
    ("verb.body", 2), ("verb.change", 2), ("verb.cognition", 2), ("verb.communication", 2),
    ("verb.competition", 2), ("verb.consumption", 2), ("verb.contact", 2), ("verb.creation", 2),
    ("verb.emotion", 2), ("verb.motion", 2), ("verb.perception", 2), ("verb.possession", 2),
    ("verb.social", 2), ("verb.stative", 2), ("verb.weather", 2), ("adj.ppl", 3),
)


class WordNetMissing(RuntimeError):
    """Debian's WordNet files are not installed, so the nltk folder cannot be built."""


def lexnames_text() -> str:
    """The `lexnames` file: `NN<TAB>name<TAB>category` per line, numbered from 00."""
    return "".join(f"{i:02d}\t{name}\t{pos}\n" for i, (name, pos) in enumerate(LEXNAMES))


def wordnet_dir(nltk_data: Path = NLTK_DATA) -> Path:
    return nltk_data / "corpora" / "wordnet"


def _same_file(src: Path, dst: Path) -> bool:
    """A copy is current when size and modification time match (copies keep the time) and no one
    but its owner may write to it (nltk refuses the file otherwise)."""
    try:
        a, b = src.stat(), dst.stat()
    except FileNotFoundError:
        return False
    return a.st_size == b.st_size and a.st_mtime_ns == b.st_mtime_ns and not b.st_mode & 0o022


def _copy(src: Path, dst: Path) -> None:
    def write(tmp: str) -> None:
        shutil.copyfile(src, tmp)
        os.chmod(tmp, 0o644)  # readable by all, writable by the owner only, as nltk requires
        st = src.stat()
        os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))  # the time marks the copy as current

    atomic_write(dst, write)


def _write_text(dst: Path, text: str) -> None:
    def write(tmp: str) -> None:
        Path(tmp).write_text(text, encoding="ascii")
        os.chmod(tmp, 0o644)

    atomic_write(dst, write)


def _make_dirs(nltk_data: Path) -> None:
    """Create the folders with mode 0755: nltk refuses data that other accounts could rewrite."""
    for d in (nltk_data, nltk_data / "corpora", wordnet_dir(nltk_data)):
        d.mkdir(parents=True, exist_ok=True)
        if d.stat().st_mode & 0o022:  # made by mkdir under a umask such as 002
            os.chmod(d, 0o755)


def build_wordnet(nltk_data: Path = NLTK_DATA, source: Path = DEBIAN_WORDNET) -> list[str]:
    """Bring `nltk_data/corpora/wordnet/` up to date; return the names of the files (re)written.

    Every file is written beside its target and renamed into place, so an interrupted or concurrent
    run never leaves a half-written file that a later check would accept.
    """
    nltk_data = Path(nltk_data)
    source = Path(source)
    if not source.is_dir():
        raise WordNetMissing(f"{source} not found: {INSTALL_HINT}")
    missing = [name for name in COPIED_FILES if not (source / name).is_file()]
    if missing:
        raise WordNetMissing(f"WordNet files missing under {source} ({', '.join(missing)}): {INSTALL_HINT}")
    _make_dirs(nltk_data)
    target = wordnet_dir(nltk_data)
    written = []
    for name in COPIED_FILES:
        if not _same_file(source / name, target / name):
            _copy(source / name, target / name)
            written.append(name)
    lexnames = target / "lexnames"
    text = lexnames_text()
    if not lexnames.is_file() or lexnames.read_text(encoding="ascii") != text:
        _write_text(lexnames, text)
        written.append("lexnames")
    return written


def ensure_wordnet(nltk_data: Path = NLTK_DATA, source: Path = DEBIAN_WORDNET) -> Path:
    """Build the folder if needed and put it first on nltk's data path; return the nltk data folder.

    Sets NLTK_DATA as well, so that child processes find it; within this process nltk reads only
    `nltk.data.path` (it read the environment variable when it was imported).
    """
    import nltk

    nltk_data = Path(nltk_data).resolve()
    build_wordnet(nltk_data, source)
    folder = str(nltk_data)
    if not nltk.data.path or nltk.data.path[0] != folder:  # first, so no other WordNet shadows it
        while folder in nltk.data.path:
            nltk.data.path.remove(folder)
        nltk.data.path.insert(0, folder)
    paths = os.environ.get("NLTK_DATA", "")
    if folder not in paths.split(os.pathsep):
        os.environ["NLTK_DATA"] = folder + (os.pathsep + paths if paths else "")
    return nltk_data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dep_engine.wordnet", description=__doc__.split("\n")[0])
    parser.add_argument("--nltk-data", type=Path, default=NLTK_DATA, help="nltk data folder to build (default: %(default)s)")
    parser.add_argument("--source", type=Path, default=DEBIAN_WORDNET, help="Debian's WordNet folder (default: %(default)s)")
    parser.add_argument("--check", action="store_true", help="also load WordNet through nltk and look up 'dog'")
    args = parser.parse_args(argv)
    try:
        written = build_wordnet(args.nltk_data, args.source)
    except WordNetMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    target = wordnet_dir(args.nltk_data)
    print(f"{target}: " + (f"wrote {', '.join(written)}" if written else "up to date"))
    if args.check:
        ensure_wordnet(args.nltk_data, args.source)
        from nltk.corpus import wordnet

        print(f"WordNet {wordnet.get_version()}: synsets('dog') = {[s.name() for s in wordnet.synsets('dog')]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
