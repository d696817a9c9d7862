"""How often the image tagger's hints name a test image's object: ImageNet's labels, the memory's
neighbours (``model.media.image.tagger.memory``), and either, counted the way ``object_named.py``
counts a caption (the reference's head noun is a word of the hint text).

    python benchmarks/tagger_hints.py --tagger weights/efficientnet-lite0 \\
        --memory data/images/train.jsonl data/emoji/train.jsonl --test data/images/test.jsonl

This is the ceiling a model that copies its hints can reach: the trained captioner names an object
only as often as some hint does (or it recognises the object itself). With a training manifest as
``--test`` it says how often training shows the answer among the hints (``--skip-own-caption``: as the
tagger option of that name leaves it out). Ends with one JSON line.
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
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    tagger = ImageTagger.build(TaggerConfig(path=args.tagger, memory=args.memory,
                                            neighbours=max(args.neighbours),
                                            skip_own_caption=args.skip_own_caption))
    build_s = time.perf_counter() - t0
    images, captions = read_memory([args.test])  # the test images and their references
    counted = [(f, h) for f, h in zip(images, map(head_noun, captions)) if h]
    hits = {"tags": 0, **{f"neighbours_{k}": 0 for k in args.neighbours},
            **{f"either_{k}": 0 for k in args.neighbours}}
    for f, head in counted:
        image = Image(f)
        feature = tagger.feature(image)
        tags, similar = " ".join(tagger.tags(image, feature)), tagger.similar(image, feature)
        hits["tags"] += named(head, tags)
        for k in args.neighbours:
            near = " ".join(similar[:k])
            hits[f"neighbours_{k}"] += named(head, near)
            hits[f"either_{k}"] += named(head, f"{tags} {near}")
    print(f"{len(counted)} of {len(captions)} test captions name an object; a hint names it for:")
    for name, n in hits.items():
        print(f"  {name:>14}: {n}")
    json_line("tagger_hints", args.threads, {"memory": args.memory, "memory_images": len(tagger.captions),
                                             "test": args.test, "skip_own_caption": args.skip_own_caption,
                                             "memory_build_s": round(build_s, 1)},
              {"rows_naming_an_object": len(counted), **hits})
    return 0


if __name__ == "__main__":
    sys.exit(main())
