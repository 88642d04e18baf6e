"""Prompts of the `llm` generator, after NVIDIA's published SDG recipe for retrieval embedders:
extract document artifacts, generate typed question-answer pairs that cite their segments, judge them."""

from __future__ import annotations

from collections.abc import Sequence

from embedtune.schemas import Chunk
from embedtune.sdg.examples import Example

SYSTEM = ("You are an expert at writing evaluation questions for search systems. "
          "Reply with JSON only, no commentary.")

ARTIFACTS = """Read the document excerpt below and extract the artifacts a question writer needs.

{segments}

Return one JSON object with these keys, each a list of short strings:
"key_concepts", "relationships", "entities", "processes", "technical_terms"."""

QUESTIONS = """Write {n} question-answer pairs that a person would type into a search engine and that the
segments below answer. Write them in the language of the segments.

{segments}

Artifacts extracted from these segments:
{artifacts}
{style}
Requirements:
- Question types: {mix}. "multi_hop": needs facts from two or more segments combined; "structural": about
  how the content is organised, compared or listed; "contextual": about one specific fact in context.
- Reasoning types to use: {reasoning}.
- Complexity from {min_complexity} (simple lookup) to {max_complexity} (expert synthesis); hops (segments
  needed) from {min_hops} to {max_hops}.
- Each question must be answerable from the cited segments alone, self-contained (no "this passage",
  "the text", "the study above"), and must not copy sentences verbatim.

Return a JSON object {{"pairs": [...]}} where each pair is
{{"question": str, "answer": str, "query_type": str, "reasoning_type": str, "complexity": int,
"hops": int, "segment_ids": [segment ids such as "S1"]}}."""

JUDGE = """Grade a synthetic search question against the segments it was written from.

{segments}

Question: {question}
Proposed answer: {answer}

Score each criterion from 1 (poor) to 10 (excellent):
- relevance: the question is about the content of the segments;
- accuracy: the proposed answer is correct according to the segments;
- context_support: the segments alone contain everything needed to answer;
- clarity: the question is unambiguous and self-contained;
- overall: your overall judgement of its value for training a search engine.

Return one JSON object: {{"relevance": n, "accuracy": n, "context_support": n, "clarity": n,
"overall": n, "reason": "one sentence"}}."""


def segment_ids(chunks: Sequence[Chunk]) -> dict[str, str]:
    """Labels shown to the model ("S1", "S2", ...) -> chunk ids."""
    return {f"S{i + 1}": c.id for i, c in enumerate(chunks)}


def render_segments(chunks: Sequence[Chunk], max_chars: int = 6000) -> str:
    title = chunks[0].title if chunks and chunks[0].title else ""
    head = f"Document: {title}\n\n" if title else ""
    body = "\n\n".join(f"[S{i + 1}] {c.text[:max_chars]}" for i, c in enumerate(chunks))
    return head + body


def render_mix(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {kind}" for kind, n in counts.items() if n > 0)


def render_style(examples: Sequence[Example], max_words: int = 40) -> str:
    """The user's example queries as style examples (empty without examples): the form (question or
    statement), length and vocabulary to imitate; their topics are not to be reused."""
    if not examples:
        return ""
    lines = ["", "Real queries written by the users of this collection, each with the start of the passage it "
             "asks about. Write every question in their style: the same form (a question or a statement), "
             "length and vocabulary, never their topics:"]
    for ex in examples:
        about = " ".join(ex.passage.split()[:max_words])
        lines.append(f"- {ex.query}  (passage: {about} ...)")
    return "\n".join(lines) + "\n"
