"""The image tagger: a classifier's top labels as text after each image (``model.media.image.tagger``)."""

import json
import shutil
from pathlib import Path

import pytest
import torch

import omni
from omni.cli import main
from omni.model.backbone import backbone_config
from omni.model.omni_model import build_model
from omni.pipeline import Pipeline
from omni.sequence import IGNORE
from omni.tokenizers.efficientnet import EfficientNetLite0
from omni.tokenizers.tagger import ImageTagger, TaggerConfig, imagenet_labels

IMAGE = torch.randint(0, 256, (3, 40, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def tagger_dir(tmp_path_factory):
    """``omni import efficientnet-lite0`` of a random network whose classifier picks classes 5 and 7."""
    tmp = tmp_path_factory.mktemp("tagger")
    torch.manual_seed(0)
    bias = torch.zeros(1000)
    bias[5], bias[7] = 10.0, 9.0  # softmax: 0.73, 0.27, then ~1e-5 for every other class
    sd = {**EfficientNetLite0().state_dict(), "_fc.weight": torch.zeros(1000, 1280), "_fc.bias": bias}
    torch.save(sd, tmp / "lite0.pth")
    assert main(["import", "efficientnet-lite0", str(tmp / "lite0.pth"), "--out", str(tmp / "eff")]) == 0
    return tmp / "eff"


def test_imagenet_labels_are_the_thousand_classes_in_order():
    labels = imagenet_labels()
    assert len(labels) == len(set(labels)) == 1000
    assert (labels[0], labels[101], labels[999]) == ("tench", "tusker", "toilet tissue")


def test_the_import_keeps_the_classifier_and_its_labels(tagger_dir):
    config = json.loads((tagger_dir / "config.json").read_text())
    assert config["labels"] == imagenet_labels()
    tagger = ImageTagger.build(TaggerConfig(path=str(tagger_dir)))
    assert tagger.tags(IMAGE) == ["electric ray", "cock"]  # classes 5 and 7, above min_prob 0.05
    assert tagger.text(IMAGE) == "Tags: electric ray, cock.\n"
    assert ImageTagger.build(TaggerConfig(path=str(tagger_dir), top_k=1)).tags(IMAGE) == ["electric ray"]
    assert ImageTagger.build(TaggerConfig(path=str(tagger_dir), min_prob=0.5)).tags(IMAGE) == ["electric ray"]
    assert ImageTagger.build(TaggerConfig(path=str(tagger_dir), min_prob=0.9)).text(IMAGE) is None
    assert not any(p.requires_grad for p in tagger.parameters()) and not tagger.train().training
    assert tagger.to(torch.bfloat16).tags(IMAGE) == ["electric ray", "cock"]  # a model cast whole


def test_bad_tagger_sections_and_folders_are_clear_errors(tagger_dir, tmp_path):
    with pytest.raises(ValueError, match="give path .* or labels"):
        ImageTagger.build(TaggerConfig())
    with pytest.raises(ValueError, match="top_k is 0 and there is no memory"):
        ImageTagger.build(TaggerConfig(path=str(tagger_dir), top_k=0))
    with pytest.raises(ValueError, match="memory needs path"):
        ImageTagger.build(TaggerConfig(labels=["a"], memory=["m.jsonl"]))
    old = tmp_path / "old"  # a folder imported before the classifier was kept
    shutil.copytree(tagger_dir, old)
    (old / "config.json").write_text(json.dumps({"model_type": "efficientnet_lite0"}))
    with pytest.raises(ValueError, match="old: not an EfficientNet-Lite0 folder with its classifier"):
        ImageTagger.build(TaggerConfig(path=str(old)))
    (old / "config.json").write_text(json.dumps({"model_type": "efficientnet_lite0", "labels": ["a", "b"]}))
    with pytest.raises(ValueError, match="old: not EfficientNet-Lite0 weights with a 2-class classifier"):
        ImageTagger.build(TaggerConfig(path=str(old)))  # labels that do not fit its classifier
    with pytest.raises(ValueError, match="nowhere/config.json: cannot read"):
        ImageTagger.build(TaggerConfig(path=str(tmp_path / "nowhere")))


def _tagging_model(tagger_dir, text_tokenizer, cross: bool = False):
    media = {"image": {"tokenizer": {"kind": "patchify", "size": "debug"}, "connector": {"kind": "mlp"},
                       "tagger": {"path": str(tagger_dir)}}}
    extra = {"cross_attention": {"every": 1, "media": ["image"]}} if cross else {}
    backbone = backbone_config("debug", max_seq_len=128, **extra)
    return Pipeline(build_model(backbone, text_tokenizer.vocab, seed=0, media=media),
                    tokenizer=text_tokenizer).eval()


@pytest.mark.parametrize("cross", [False, True])
def test_the_tags_follow_the_image_as_input_text(tagger_dir, text_tokenizer, cross):
    model = _tagging_model(tagger_dir, text_tokenizer, cross)
    proc = model.processor
    sample = proc.sample([{"role": "user", "content": [omni.Image(IMAGE), "What is it?"]},
                          {"role": "assistant", "content": "A cock."},
                          {"role": "user", "content": "Sure?"}])
    r = proc.render(sample)
    end = r.ids.tolist().index(proc.vocab.id("<|/image|>"))
    tags = text_tokenizer.encode("Tags: electric ray, cock.\n")
    assert r.ids[end + 1:end + 1 + len(tags)].tolist() == tags
    assert (r.targets[end + 1:end + 1 + len(tags)] == IGNORE).all()  # input, never learned
    if cross:
        assert model.reads_by_cross_attention("image")
    assert isinstance(model.generate([omni.Image(IMAGE), "What is it?"], max_new_tokens=2), str)


def test_a_checkpoint_with_a_tagger_loads_without_its_folder(tagger_dir, text_tokenizer, tmp_path):
    weights = tmp_path / "weights"
    shutil.copytree(tagger_dir, weights)
    model = _tagging_model(weights, text_tokenizer)
    key = model.processor.fingerprint()
    model.save_pretrained(tmp_path / "ckpt")
    shutil.rmtree(weights)
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())["media"]["image"]["tagger"]
    assert "path" not in saved and saved["labels"] == imagenet_labels() and saved["top_k"] == 3
    loaded = omni.load(tmp_path / "ckpt")
    assert loaded.processor.encoders["image"].tag_text(IMAGE) == "Tags: electric ray, cock.\n"
    assert loaded.processor.fingerprint() == key
    with torch.no_grad():  # the prepared-sample cache's key follows the tagger's weights
        loaded.model.encoders["image"].tagger.classifier.bias[7] += 5.0
    assert loaded.processor.fingerprint() != key


def _memory(tmp_path, captions: list[str]) -> Path:
    """A manifest of one random-noise PNG a caption (image i from seed i)."""
    from PIL import Image as PILImage

    (tmp_path / "img").mkdir(exist_ok=True)
    with open(tmp_path / "memory.jsonl", "w") as f:
        for i, caption in enumerate(captions):
            PILImage.fromarray(_noise(i).permute(1, 2, 0).numpy()).save(tmp_path / "img" / f"{i}.png")
            f.write(json.dumps({"image": f"img/{i}.png", "caption": caption}) + "\n")
    return tmp_path / "memory.jsonl"


def _noise(seed: int, jitter: int = 0) -> torch.Tensor:
    x = torch.randint(0, 256, (3, 48, 48), generator=torch.Generator().manual_seed(seed)).to(torch.int16)
    if jitter:  # a near copy: a few grey levels of noise on every pixel
        x = x + torch.randint(-jitter, jitter + 1, x.shape, generator=torch.Generator().manual_seed(99))
    return x.clamp(0, 255).to(torch.uint8)


def test_a_memory_adds_the_captions_of_the_nearest_images(tagger_dir, tmp_path):
    manifest = _memory(tmp_path, ["A lion.", "A crane.", "A lion.", "A toucan."])
    tagger = ImageTagger.build(TaggerConfig(path=str(tagger_dir), memory=[str(manifest)], neighbours=2))
    assert tagger.captions == ["A lion.", "A crane.", "A lion.", "A toucan."]
    assert tagger.similar(_noise(1, jitter=3))[0] == "A crane."  # a near copy of image 1
    # image 1 itself: never its own neighbour; the two lions count as one caption
    similar = tagger.similar(_noise(1))
    assert "A crane." not in similar and len(similar) == 2
    text = tagger.text(_noise(3, jitter=3))
    assert text.startswith("Tags: electric ray, cock.\nSimilar: A toucan. ") and text.endswith(".\n")
    only = ImageTagger.build(TaggerConfig(path=str(tagger_dir), memory=[str(manifest)], top_k=0,
                                          neighbours=1))
    assert only.text(_noise(0, jitter=3)) == "Similar: A lion.\n"
    assert only.to(torch.bfloat16).similar(_noise(0, jitter=3)) == ["A lion."]


def test_skip_own_caption_hides_a_memory_images_answer(tagger_dir, tmp_path):
    manifest = _memory(tmp_path, ["A lion.", "A crane.", "A lion.", "A toucan."])
    cfg = dict(path=str(tagger_dir), memory=[str(manifest)], neighbours=3)
    plain, skip = (ImageTagger.build(TaggerConfig(**cfg, skip_own_caption=s)) for s in (False, True))
    # image 0 (a lion) in the memory: the other lion is its neighbour unless its own caption is skipped
    assert sorted(plain.similar(_noise(0))) == ["A crane.", "A lion.", "A toucan."]
    assert sorted(skip.similar(_noise(0))) == ["A crane.", "A toucan."]
    # an image the memory does not hold (a near copy of the lion) keeps every neighbour
    assert skip.similar(_noise(0, jitter=3)) == plain.similar(_noise(0, jitter=3))
    assert skip.standalone()["skip_own_caption"] and not plain.standalone()["skip_own_caption"]


def test_a_tagger_memory_is_saved_and_keys_the_cache_by_its_files(tagger_dir, text_tokenizer, tmp_path):
    manifest = _memory(tmp_path, ["A lion.", "A crane.", "A toucan."])
    media = {"image": {"tokenizer": {"kind": "patchify", "size": "debug"}, "connector": {"kind": "mlp"},
                       "tagger": {"path": str(tagger_dir), "memory": [str(manifest)], "neighbours": 1}}}
    model = Pipeline(build_model(backbone_config("debug", max_seq_len=128), text_tokenizer.vocab, seed=0,
                                 media=media), tokenizer=text_tokenizer).eval()
    key, text = model.processor.fingerprint(), model.processor.encoders["image"].tag_text(_noise(2, 3))
    assert text.endswith("Similar: A toucan.\n")
    model.save_pretrained(tmp_path / "ckpt")
    shutil.rmtree(tmp_path / "img")  # the memory's images are not needed once saved
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())["media"]["image"]["tagger"]
    assert "memory" not in saved and saved["captions"] == ["A lion.", "A crane.", "A toucan."]
    loaded = omni.load(tmp_path / "ckpt")
    tagger = loaded.model.encoders["image"].tagger
    assert loaded.processor.encoders["image"].tag_text(_noise(2, 3)) == text
    assert loaded.processor.fingerprint() == key
    with torch.no_grad():  # the features' last bits (they vary with the thread count) do not key it
        tagger.memory += 1e-7
    assert loaded.processor.fingerprint() == key
    tagger.captions[0] = "A tiger."  # what the memory holds does
    tagger.memory_digest = "0" * 64
    assert loaded.processor.fingerprint() != key


def test_bad_memories_are_clear_errors(tagger_dir, tmp_path):
    manifest = _memory(tmp_path, ["A lion.", "A crane."])
    (tmp_path / "img" / "1.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="img/1.png: a tagger memory image that cannot be read"):
        ImageTagger.build(TaggerConfig(path=str(tagger_dir), memory=[str(manifest)]))
    manifest.write_text(json.dumps({"image": "img/0.png"}) + "\n")
    with pytest.raises(ValueError, match="memory.jsonl: row 1 has no 'image' path and 'caption' text"):
        ImageTagger.build(TaggerConfig(path=str(tagger_dir), memory=[str(manifest)]))
    with pytest.raises(ValueError, match="nothing.jsonl: manifest not found"):
        ImageTagger.build(TaggerConfig(path=str(tagger_dir), memory=[str(tmp_path / "nothing.jsonl")]))


def test_tagger_hints_counts_how_often_a_hint_names_the_object(tagger_dir, tmp_path, capsys):
    import importlib.util

    from PIL import Image as PILImage

    root = Path(__file__).resolve().parents[2]
    spec = importlib.util.spec_from_file_location("tagger_hints", root / "benchmarks" / "tagger_hints.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    memory = _memory(tmp_path, ["A lion.", "A crane.", "A toucan."])
    test = tmp_path / "test.jsonl"
    with open(test, "w") as f:  # a near copy of the lion; the tagger's own top label; a slogan
        for i, (seed, caption) in enumerate([(0, "A lion."), (7, "A cock."), (8, "Boom!")]):
            PILImage.fromarray(_noise(seed, jitter=3).permute(1, 2, 0).numpy()).save(tmp_path / f"t{i}.png")
            f.write(json.dumps({"image": f"t{i}.png", "caption": caption}) + "\n")
    args = ["--tagger", str(tagger_dir), "--memory", str(memory), "--test", str(test), "--neighbours", "1",
            "--threads", "1"]
    assert bench.main(args) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    copy = {k: line["results"].pop(k) for k in ("copy_nearest_cider_d", "copy_nearest_bleu4")}
    assert line["results"] == {"rows_naming_an_object": 2, "tags": 1, "neighbours_1": 1, "either_1": 2}
    assert copy["copy_nearest_cider_d"] > 0  # "A lion." copied for the lion's near copy
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             patch_size=8, image_size=32)).save_pretrained(tmp_path / "dino")
    assert bench.main([*args, "--tower", str(tmp_path / "dino")]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["config"]["retrieve_by"] == str(tmp_path / "dino")  # by a random tower: counts only
    assert line["results"]["rows_naming_an_object"] == 2 and "copy_nearest_cider_d" in line["results"]


def test_retrieve_by_tower_searches_the_memory_by_the_towers_feature(tagger_dir, text_tokenizer, tmp_path):
    manifest = _memory(tmp_path, ["A lion.", "A crane.", "A toucan."])
    tagger = {"path": str(tagger_dir), "memory": [str(manifest)], "neighbours": 1, "top_k": 0,
              "retrieve_by": "tower"}
    media = {"image": {"tokenizer": {"kind": "dinov2", "size": "debug"}, "connector": {"kind": "mlp"},
                       "tagger": tagger}}
    model = Pipeline(build_model(backbone_config("debug", max_seq_len=128), text_tokenizer.vocab, seed=0,
                                 media=media), tokenizer=text_tokenizer).eval()
    encoder = model.model.encoders["image"]
    tower, memory = encoder.tokenizer, encoder.tagger
    feats = torch.stack([tower.image_feature(_noise(i)) for i in range(3)])  # the CLS features
    assert memory.memory.shape == (3, tower.hidden_dim)
    assert torch.allclose(memory.memory, torch.nn.functional.normalize(feats - feats.mean(0), dim=-1),
                          atol=1e-5)
    text, key = encoder.tag_text(_noise(2, jitter=3)), model.processor.fingerprint()
    assert text == "Similar: A toucan.\n"
    model.save_pretrained(tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())["media"]["image"]["tagger"]
    assert saved["retrieve_by"] == "tower"
    loaded = omni.load(tmp_path / "ckpt")
    assert loaded.processor.encoders["image"].tag_text(_noise(2, jitter=3)) == text
    assert loaded.processor.fingerprint() == key
    with torch.no_grad():  # the neighbours follow the tower's weights, so the cache key does too
        next(loaded.model.encoders["image"].tokenizer.parameters()).add_(0.1)
    assert loaded.processor.fingerprint() != key


def test_retrieve_by_needs_a_known_kind_and_a_frozen_tower(tagger_dir, text_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="retrieve_by must be one of classifier, tower, got 'clip'"):
        TaggerConfig(path=str(tagger_dir), retrieve_by="clip").validate()
    with pytest.raises(ValueError, match="retrieve_by: tower needs an image tower"):
        ImageTagger.build(TaggerConfig(path=str(tagger_dir), retrieve_by="tower"))
    media = {"image": {"tokenizer": {"kind": "patchify", "size": "debug"}, "connector": {"kind": "mlp"},
                       "tagger": {"path": str(tagger_dir), "retrieve_by": "tower"}}}
    with pytest.raises(ValueError, match="retrieve_by: tower needs a frozen image tower"):
        build_model(backbone_config("debug", max_seq_len=128), text_tokenizer.vocab, seed=0, media=media)
