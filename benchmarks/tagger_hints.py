"""How often the image tagger's hints name a test image's object: ImageNet's labels, the memory's
neighbours (``model.media.image.tagger.memory``), and either, counted the way ``object_named.py``
counts a caption (the reference's head noun is a word of the hint text).

    python benchmarks/tagger_hints.py --tagger weights/efficientnet-lite0 \\
        --memory data/images/train.jsonl data/emoji/train.jsonl --test data/images/test.jsonl

This is the ceiling a model that copies its hints can reach: the trained captioner names an object
only as often as some hint does (or it recognises the object itself). It also scores the plainest
retrieval captioner, the nearest memory image's caption copied as the prediction (CIDEr-D and BLEU-4
over every test row, ``omni.metrics``): the bar a captioner reading those hints has to clear. With a
training manifest as ``--test`` it says how often training shows the answer among the hints
(``--skip-own-caption``: as the tagger option of that name leaves it out). ``--tower`` retrieves by an
image tower's CLS feature instead of the classifier's (the tagger's ``retrieve_by: tower``)::

    python benchmarks/tagger_hints.py ... --tower weights/dinov2-s14 --tower-kind dinov2

Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from object_named import head_noun, named  # noqa: E402

from omni.media.image import Image  # noqa: E402
from omni.metrics import bleu, cider_d  # noqa: E402
from omni.tokenizers.image import ImageTokenizerConfig, build_image_tokenizer  # noqa: E402
from omni.tokenizers.tagger import ImageTagger, TaggerConfig, read_memory  # noqa: E402

from common import json_line  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tagger", required=True, help="an omni import efficientnet-lite0 folder")
    ap.add_argument("--memory", nargs="+", required=True, help="manifests of captioned images")
    ap.add_argument("--test", required=True, help="a manifest of images with reference captions")
    ap.add_argument("--neighbours", type=int, nargs="+", default=[1, 3, 5])
    ap.add_argument("--skip-own-caption", action="store_true",
                    help="leave out the memory images that share a (memory) test image's caption")
    ap.add_argument("--tower", help="an image tower folder to retrieve by (retrieve_by: tower)")
    ap.add_argument("--tower-kind", default="dinov2", help="its image_tokenizer kind")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    tower = None if args.tower is None else build_image_tokenizer(
        ImageTokenizerConfig(kind=args.tower_kind, path=args.tower, freeze=True))
    by = {} if tower is None else {"retriever": tower.image_feature, "key_dim": tower.hidden_dim}
    tagger = ImageTagger.build(TaggerConfig(path=args.tagger, memory=args.memory,
                                            neighbours=max(args.neighbours),
                                            skip_own_caption=args.skip_own_caption,
                                            retrieve_by="tower" if by else "classifier"), **by)
    build_s = time.perf_counter() - t0
    images, captions = read_memory([args.test])  # the test images and their references
    hits = {"tags": 0, **{f"neighbours_{k}": 0 for k in args.neighbours},
            **{f"either_{k}": 0 for k in args.neighbours}}
    copied, counted = [], 0
    for f, head in zip(images, map(head_noun, captions)):
        image = Image(f)
        feature = tagger.feature(image)  # the labels' and, by the classifier, the neighbours' features
        similar = tagger.similar(image, None if by else feature)
        copied.append(similar[0] if similar else "")
        if not head:
            continue
        counted += 1
        tags = " ".join(tagger.tags(image, feature))
        hits["tags"] += named(head, tags)
        for k in args.neighbours:
            near = " ".join(similar[:k])
            hits[f"neighbours_{k}"] += named(head, near)
            hits[f"either_{k}"] += named(head, f"{tags} {near}")
    copy = {"copy_nearest_cider_d": round(cider_d([[c] for c in captions], copied), 3),
            "copy_nearest_bleu4": round(bleu([[c] for c in captions], copied), 3)}
    print(f"{counted} of {len(captions)} test captions name an object; a hint names it for:")
    for name, n in hits.items():
        print(f"  {name:>14}: {n}")
    print(f"the nearest memory image's caption, copied: CIDEr-D {copy['copy_nearest_cider_d']}, "
          f"BLEU-4 {copy['copy_nearest_bleu4']}")
    json_line("tagger_hints", args.threads, {"memory": args.memory, "memory_images": len(tagger.captions),
                                             "test": args.test, "skip_own_caption": args.skip_own_caption,
                                             "retrieve_by": "classifier" if tower is None else args.tower,
                                             "memory_build_s": round(build_s, 1)},
              {"rows_naming_an_object": counted, **hits, **copy})
    return 0


if __name__ == "__main__":
    sys.exit(main())
