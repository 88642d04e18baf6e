"""Markdown read as a Markdown parser reads it; short fragments merged; every file not read counted by reason."""

from __future__ import annotations

import logging

from embedtune.artifacts import RunDir, read_jsonl
from embedtune.config import load_recipe
from embedtune.corpus import iter_documents, run_corpus
from embedtune.corpus.chunking import chunk_text, merge_fragments
from embedtune.corpus.clean import normalize
from embedtune.corpus.loaders import LoadStats
from embedtune.corpus.markdown import markdown_to_text

# An mdBook chapter as the Rust book writes them: no `#` title, includes, comments, link definitions.
CHAPTER = """\
<!-- Old heading. Do not remove or links may break. -->
<a id="installation"></a>

## Installation

The first step is to install Rust. We'll download Rust through `rustup`, a
command line tool for managing Rust versions. See [the docs][install] for more.

{{#include ../listings/ch01/no-listing-01/output.txt}}

```rust
{{#rustdoc_include ../listings/ch01/listing-01-01/src/main.rs:here}}
# fn main() {
    println!("Hello, {{}}!");
# }
```

### Troubleshooting

{% include warning.html %}Run `rustc --version` to check the *installation* worked.

| command | does |
|---|---|
| rustup update | updates Rust |

[install]: https://www.rust-lang.org/tools/install.html
"""


def test_title_is_the_first_heading_and_h1_wins():
    assert markdown_to_text(CHAPTER).title == "Installation"  # no `#` heading: the first heading
    assert markdown_to_text("## Later\n\ntext\n\n# The Title\n").title == "The Title"
    assert markdown_to_text("---\ntitle: \"From front matter\"\nlayout: x\n---\n# H1\n").title == "From front matter"


def test_comments_directives_and_link_targets_are_out_code_stays():
    md = markdown_to_text(CHAPTER)
    for gone in ("<!--", "Old heading", "{{#", "{%", "include", "https://", ".html", "<a", "[install]", "*"):
        assert gone not in md.text, gone
    assert "We'll download Rust through rustup, a command line tool for managing Rust versions." in md.text
    assert "See the docs for more." in md.text
    # the code block's code, verbatim but for indentation; its `#` lines are code, not headings
    assert '# fn main() {\nprintln!("Hello, {{}}!");\n# }' in md.text
    assert "Run rustc --version to check the installation worked." in md.text
    assert "command | does\nrustup update | updates Rust" in md.text
    assert normalize(md.text) == md.text  # so the stage's normalisation keeps the section offsets


def test_sections_are_heading_paths_at_their_offsets():
    md = markdown_to_text(CHAPTER)
    assert [path for _, path in md.sections] == ["Installation", "Installation > Troubleshooting"]
    for offset, path in md.sections:
        assert md.text[offset:].startswith(path.rpartition(" > ")[2])
    nested = markdown_to_text("# A\n\n## B\n\nx\n\n### C\n\ny\n\n## D\n\nz\n")
    assert [p for _, p in nested.sections] == ["A", "A > B", "A > B > C", "A > D"]


def test_merge_fragments_joins_a_short_tail_when_it_fits(default_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    text = "A sentence about harbours and their tides, long enough to stand alone.\n\nSee also."
    spans = chunk_text(text, tok, max_tokens=16)
    assert [text[s:e] for s, e in spans][-1] == "See also."
    merged = merge_fragments(text, spans, tok, max_tokens=64, min_chars=20)
    assert [text[s:e] for s, e in merged] == [text]
    # a fragment that fits no neighbour stays rather than break the token budget
    assert merge_fragments(text, spans, tok, max_tokens=16, min_chars=20) == spans
    assert merge_fragments(text, spans, tok, max_tokens=64, min_chars=0) == spans


def _book(tmp_path):
    root = tmp_path / "book"
    (root / "img").mkdir(parents=True)
    (root / "ch01.md").write_text(CHAPTER)
    (root / "ch02.md").write_text("# Guessing Game\n\nLet's jump into Rust by working through a project.\n\n"
                                  "## Setting Up\n\nTo set up a new project, go to the projects directory.\n\n"
                                  "## Notes\n")
    (root / "img" / "ferris.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0")
    (root / "img" / "trpl.svg").write_text("<svg/>")
    (root / "notes.txt").write_bytes(b"text with a \0 NUL byte")
    (root / "empty.md").write_text("")
    (root / ".hidden.md").write_text("# secret")
    return root


def test_every_file_not_read_is_counted_by_reason_and_logged(tmp_path):
    stats = LoadStats()
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(r.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("embedtune")
    level, logger.level = logger.level, logging.INFO
    logger.addHandler(handler)
    try:
        docs = {d.id for d in iter_documents(_book(tmp_path), stats)}
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert docs == {"ch01.md", "ch02.md"}
    assert stats.by_reason() == {"unsupported extension": 2, "binary content": 1, "empty file": 1,
                                 "hidden file": 1}
    assert {p for p, _, _ in stats.not_read} == {"img/ferris.png", "img/trpl.svg", "notes.txt", "empty.md",
                                                 ".hidden.md"}
    line = next(r for r in records if "files not read" in r)
    assert line.startswith("5 files not read: 2 unsupported extension (.png 1, .svg 1)")


def test_run_corpus_on_markdown_chunks_with_sections_and_counts(tmp_path):
    recipe = load_recipe(None, [f"corpus.path={_book(tmp_path)}", "corpus.chunk_tokens=64"])
    run = RunDir(tmp_path / "run")
    manifest = run_corpus(recipe, run)
    rows = list(read_jsonl(run.path("corpus", "chunks.jsonl")))
    assert {r["title"] for r in rows} == {"Installation", "Guessing Game"}
    assert all("{{#" not in r["text"] and "<!--" not in r["text"] for r in rows)
    # chunked by section: each heading starts its chunk, which names the heading path
    assert [(r["section"], r["text"].split("\n")[0]) for r in rows if r["doc_id"] == "ch02.md"] == [
        ("Guessing Game", "Guessing Game"), ("Guessing Game > Setting Up", "Setting Up")]
    assert rows[-1]["text"].endswith("projects directory.\n\nNotes")  # the lone last heading was merged
    assert all(len(r["text"]) >= 50 for r in rows)
    c = manifest.counts
    assert c["skipped_files"] == 5 and c["skipped_by_reason"]["unsupported extension"] == 2
    assert c["merged_fragments"] == 1
    listed = list(read_jsonl(run.path("corpus", "skipped.jsonl")))
    assert {r["reason"] for r in listed} == {"unsupported extension", "binary content", "empty file", "hidden file"}
