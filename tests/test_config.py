from dataclasses import fields

import pytest
import yaml

from omni.config import (
    REPO_ROOT,
    RecipeConfig,
    TextTokenizerSpec,
    TrainConfig,
    apply_overrides,
    find_recipe,
    load_recipe,
    load_tokenizer_spec,
)
from omni.model.backbone import SIZES

RECIPES = sorted((REPO_ROOT / "recipes").rglob("*.yaml"))
TOKENIZER_SPECS = sorted((REPO_ROOT / "tokenizers").rglob("*.yaml"))


def _ids(paths):
    return [str(p.relative_to(REPO_ROOT)) for p in paths]


def test_shipped_recipes_exist():
    assert RECIPES, f"no recipes found under {REPO_ROOT / 'recipes'}"


@pytest.mark.parametrize("path", RECIPES, ids=_ids(RECIPES))
def test_every_recipe_loads_and_validates(path):
    cfg = load_recipe(str(path))
    assert isinstance(cfg, RecipeConfig)
    assert cfg.model.pretrained or cfg.data.seq_len <= cfg.model.max_seq_len  # else: the checkpoint's context
    # by name, as the CLI finds it: recipes/text/tiny.yaml -> "text/tiny"
    name = str(path.relative_to(REPO_ROOT / "recipes").with_suffix(""))
    assert find_recipe(name).resolve() == path.resolve()
    assert load_recipe(name) == cfg


@pytest.mark.parametrize("path", TOKENIZER_SPECS, ids=_ids(TOKENIZER_SPECS))
def test_every_tokenizer_spec_loads_and_validates(path):
    if yaml.safe_load(path.read_text(encoding="utf-8")).get("kind") == "audio_codec":
        from omni.train.codec import load_codec_spec

        spec = load_codec_spec(str(path))
        assert load_codec_spec(path.stem) == spec
        return
    spec = load_tokenizer_spec(str(path))
    assert isinstance(spec, TextTokenizerSpec)
    assert load_tokenizer_spec(path.stem) == spec


def _write(tmp_path, data, name="r.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data, encoding="utf-8")
    return str(p)


def test_unknown_top_level_key_names_key_and_allowed(tmp_path):
    with pytest.raises(ValueError) as e:
        load_recipe(_write(tmp_path, {"modle": {"size": "tiny"}}))
    msg = str(e.value)
    assert "modle" in msg
    for allowed in ("model", "tokenizer", "data", "train"):
        assert allowed in msg


def test_unknown_nested_key_names_dotted_key_and_allowed(tmp_path):
    with pytest.raises(ValueError) as e:
        load_recipe(_write(tmp_path, {"train": {"stepz": 3}}))
    msg = str(e.value)
    assert "train.stepz" in msg
    for f in fields(TrainConfig):
        assert f.name in msg


@pytest.mark.parametrize("section,key,value,expect", [
    ("train", "steps", "many", "train.steps must be an integer"),
    ("train", "steps", 2.5, "train.steps must be an integer"),
    ("train", "resume", 1, "train.resume must be true or false"),
    ("train", "lr", "fast", "train.lr must be a number"),
    ("train", "betas", 0.9, "train.betas must be a list"),
    ("model", "size", 5, "model.size must be a string"),
    ("model", "num_layers", True, "model.num_layers must be an integer"),
])
def test_wrong_type_is_an_error(tmp_path, section, key, value, expect):
    with pytest.raises(ValueError, match=expect):
        load_recipe(_write(tmp_path, {section: {key: value}}))


def test_section_must_be_a_mapping(tmp_path):
    with pytest.raises(ValueError, match="model must be a mapping"):
        load_recipe(_write(tmp_path, {"model": 3}))


def test_bad_choice_lists_allowed_values(tmp_path):
    with pytest.raises(ValueError) as e:
        load_recipe(_write(tmp_path, {"model": {"size": "huge"}}))
    assert "model.size" in str(e.value)
    for size in SIZES:
        assert size in str(e.value)


def test_precedence_override_beats_file_beats_default(tmp_path):
    path = _write(tmp_path, {"train": {"steps": 5, "lr": 0.01, "warmup_steps": 1},
                             "model": {"size": "debug"}})
    cfg = load_recipe(path, ["train.steps=7", "model.dim=128", "train.lr=3e-4", "train.betas=[0.8, 0.9]"])
    assert cfg.train.steps == 7  # override over file
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)  # "3e-4" is a str to YAML
    assert cfg.train.betas == [0.8, 0.9]
    assert cfg.model.size == "debug" and cfg.model.dim == 128  # file kept, new key added to the section
    assert cfg.train.batch_size == TrainConfig().batch_size  # default
    assert load_recipe(path).train.steps == 5 and load_recipe(path).train.lr == pytest.approx(0.01)


def test_overrides_do_not_mutate_input():
    raw = {"train": {"steps": 5}}
    out = apply_overrides(raw, ["train.steps=9", "data.pack=false"])
    assert raw == {"train": {"steps": 5}}
    assert out == {"train": {"steps": 9}, "data": {"pack": False}}


def test_an_override_that_is_not_yaml_is_a_string():
    out = apply_overrides({}, ["data.files={split}/*.parquet", "data.path=[a"])
    assert out == {"data": {"files": "{split}/*.parquet", "path": "[a"}}


@pytest.mark.parametrize("bad", ["train.steps", "=3", "train.steps:3"])
def test_bad_override_syntax(tmp_path, bad):
    with pytest.raises(ValueError, match="key=value"):
        load_recipe(_write(tmp_path, {}), [bad])


def test_override_through_a_scalar_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="'steps' is not a section"):
        load_recipe(_write(tmp_path, {"train": {"steps": 5}}), ["train.steps.x=1"])


def test_unknown_override_key_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="train.stepz"):
        load_recipe(_write(tmp_path, {}), ["train.stepz=1"])


def test_seq_len_longer_than_context_is_an_error(tmp_path):
    path = _write(tmp_path, {"model": {"max_seq_len": 128}, "data": {"seq_len": 128}})
    assert load_recipe(path).data.seq_len == 128
    with pytest.raises(ValueError, match=r"data.seq_len \(129\).*model.max_seq_len \(128\)"):
        load_recipe(path, ["data.seq_len=129"])


@pytest.mark.parametrize("override,key", [("train.warmup_steps=2000", "train.warmup_steps"),
                                          ("train.lr=0", "train.lr"), ("train.betas=[0.9]", "train.betas"),
                                          ("data.on_bad_sample=ignore", "data.on_bad_sample"),
                                          ("model.attn_backend=flash", "model.attn_backend"),
                                          ("train.steps=0", "train.steps"),
                                          ("train.activation_checkpointing=full",
                                           "train.activation_checkpointing"),
                                          ("train.loss_chunk=-1", "train.loss_chunk"),
                                          ("train.parallel=zero3", "train.parallel"),
                                          ("train.parallel=fsdp train.mixed_precision=fp16",
                                           "train.parallel")])
def test_impossible_values_name_the_key(tmp_path, override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_recipe(_write(tmp_path, {}), override.split())


def test_unknown_recipe_lists_available_ones():
    with pytest.raises(ValueError) as e:
        load_recipe("no/such_recipe")
    msg = str(e.value)
    assert "no/such_recipe" in msg and "available:" in msg
    for p in RECIPES:
        assert str(p.relative_to(REPO_ROOT / "recipes").with_suffix("")) in msg


@pytest.mark.parametrize("name, meant", [("text/tinny", "text/tiny"), ("llava/caption", "llava/caption_tiny"),
                                         ("whisper/asr_tine", "whisper/asr_tiny")])
def test_a_misspelled_recipe_name_gets_a_did_you_mean(name, meant):
    with pytest.raises(ValueError, match=f"did you mean {meant}\\?"):
        load_recipe(name)
    with pytest.raises(ValueError, match="did you mean text_spm\\?"):
        load_tokenizer_spec("text_sp")


@pytest.mark.parametrize("override, meant", [("train.step=3", "train.steps"), ("trian.steps=3", "train"),
                                             ("data.seqlen=64", "data.seq_len"),
                                             ("model.szie=debug", "model.size")])
def test_a_misspelled_override_key_gets_a_did_you_mean(tmp_path, override, meant):
    with pytest.raises(ValueError, match=f"did you mean {meant}\\?"):
        load_recipe(_write(tmp_path, {}), [override])
    with pytest.raises(ValueError) as e:  # nothing close: no guess
        load_recipe(_write(tmp_path, {}), ["train.xyzzy=1"])
    assert "did you mean" not in str(e.value)


def test_recipe_file_must_be_a_mapping(tmp_path):
    with pytest.raises(ValueError, match="expected a mapping"):
        load_recipe(_write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ValueError, match="not valid YAML"):
        load_recipe(_write(tmp_path, "train: [unclosed\n", name="bad.yaml"))


def test_tokenizer_spec_validation(tmp_path):
    path = _write(tmp_path, {"vocab_size": 512, "model_type": "bpe"}, name="spec.yaml")
    spec = load_tokenizer_spec(path, ["seed=3"])
    assert (spec.vocab_size, spec.model_type, spec.seed) == (512, "bpe", 3)
    with pytest.raises(ValueError, match="vocab_size must be >="):
        load_tokenizer_spec(path, ["vocab_size=20"])
    with pytest.raises(ValueError, match="model_type"):
        load_tokenizer_spec(path, ["model_type=wordpiece"])
    with pytest.raises(ValueError, match="vocab_sise"):
        load_tokenizer_spec(path, ["vocab_sise=600"])


def test_a_bare_yaml_no_is_explained():
    from omni.config import load_recipe

    with pytest.raises(ValueError, match=r'mixed_precision must be a string, got False '
                                         r'.*quote it, e.g. mixed_precision: "no"'):
        load_recipe("text/tiny", ["train.mixed_precision=no"])
    assert load_recipe("text/tiny", ['train.mixed_precision="no"']).train.mixed_precision == "no"


@pytest.mark.parametrize("data, expect", [
    ({"task": "caption", "media": "video", "start": -1.0}, "data.start must be seconds >= 0"),
    ({"task": "caption", "media": "video", "start": 2.0, "end": 1.0}, r"data.end \(1.0\) must be after"),
    ({"task": "caption", "media": "image", "end": 1.0}, "data.start / data.end cut video clips"),
])
def test_video_window_keys_are_checked(tmp_path, data, expect):
    with pytest.raises(ValueError, match=expect):
        load_recipe(_write(tmp_path, {"data": data}))
