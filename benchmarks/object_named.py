"""How many test images get their object named: a plain count over ``omni eval``'s predictions.

    omni eval --ckpt runs/llava_smollm_dino_stage2_tiny --split test
    python benchmarks/object_named.py runs/llava_smollm_dino_stage2_tiny [runs/llava_caption_tiny ...]

Reads each run's ``eval_<split>.jsonl`` (id, reference, prediction). The rule, kept simple so it can
be checked by eye:

- A reference **names an object** when it starts with a determiner (a, an, the, some, another,
  our): "A crowned crane.", "Some blueberries.". Slogans and bare words ("Boom!!!", "Divided by.",
  "Remember to flush the toilet ...") are left out of the count, and the script says how many.
- Its **head noun** is the last word of its first noun phrase: the text up to the first
  punctuation mark or the first of a few function words (with, in, for, of, is, ...), except that
  "a pair of X" / "a bunch of X" read on to X. "A pair of open scissors." -> scissors;
  "A peacock (a male peafowl)." -> peacock; "The sign for the letter E ..." -> sign; a moving-stamp
  clip's "a frog moves up slowly" -> frog. A head of
  one character keeps the word before it: "The letter g." -> "letter g".
- The object is **named correctly** when the head noun is a word of the prediction, case and a
  plural ending (-s, -es, -ies) ignored.

Ends with one JSON line (``common.json_line``) with the count for each run and, with
``--examples N``, the first N rows that name an object (prediction against reference).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import json_line  # noqa: E402  (benchmarks/common.py, also when loaded from a test)

DETERMINERS = {"a", "an", "the", "some", "another", "our"}
STOP = {"with", "in", "on", "at", "for", "of", "is", "are", "and", "called", "which", "that", "to",
        "used", "carries", "make", "makes", "have", "has", "one", "ahead", "will",
        "dancing", "covered",  # the participles of this test split's references
        "moves"}  # the video clips' "a frog moves up slowly": the object is the frog
QUANTITY = {"pair", "bunch"}  # "a pair of X": the object is X


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def stem(word: str) -> str:
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("ches", "shes", "sses", "xes")):
        return word[:-2]
    if word.endswith("s") and not word.endswith("ss") and len(word) > 3:
        return word[:-1]
    return word


def head_noun(reference: str) -> str | None:
    """The object a reference caption names, or None when it names none (see the module doc)."""
    clause = re.split(r"[.,!?;:()\u2014\u2013]", reference.strip(), maxsplit=1)[0]
    ws = words(clause)
    if not ws or ws[0] not in DETERMINERS:
        return None
    phrase: list[str] = []
    for w in ws[1:]:
        if w in STOP:
            if w == "of" and phrase and phrase[-1] in QUANTITY:
                phrase = []
                continue
            break
        phrase.append(w)
    if not phrase:
        return None
    if len(phrase[-1]) == 1 and len(phrase) > 1:  # "The letter g": a one-character head needs its noun
        return " ".join(phrase[-2:])
    return phrase[-1]


def named(head: str, prediction: str) -> bool:
    """``head`` is a word of ``prediction`` (a plural ending ignored); a head of two words (the
    letter "letter g") must appear as that bigram."""
    ws = [stem(w) for w in words(prediction)]
    want = [stem(w) for w in head.split()]
    return any(ws[i:i + len(want)] == want for i in range(len(ws)))


def score(path: Path) -> dict:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    counted = [(r, head_noun(r["reference"])) for r in rows]
    counted = [(r, h) for r, h in counted if h]
    hits = [named(h, r["prediction"]) for r, h in counted]
    return {"file": str(path), "rows": len(rows), "rows_naming_an_object": len(counted),
            "named_correctly": sum(hits), "share": round(sum(hits) / max(len(counted), 1), 3),
            "examples": [{"id": r.get("id"), "head_noun": h, "named": ok, "reference": r["reference"],
                          "prediction": r["prediction"]} for (r, h), ok in zip(counted, hits)]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="run directories (or eval_<split>.jsonl files)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--examples", type=int, default=10, help="rows to show for each run")
    args = ap.parse_args(argv)
    results = {}
    for run in args.runs:
        p = Path(run)
        path = p if p.suffix == ".jsonl" else p / f"eval_{args.split}.jsonl"
        res = score(path)
        examples = res.pop("examples")
        print(f"{run}: object named in {res['named_correctly']} of {res['rows_naming_an_object']} test rows "
              f"that name one ({res['rows']} rows in all)")
        for e in examples[:args.examples]:
            print(f"  [{'x' if e['named'] else ' '}] {e['head_noun']:>12}  pred: {e['prediction']!r}  "
                  f"ref: {e['reference']!r}")
        res["examples"] = examples[:args.examples]
        results[run] = res
    json_line("object_named", 0, {"split": args.split}, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
