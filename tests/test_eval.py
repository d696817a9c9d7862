"""``omni eval``: speech WER on the clips as they are and on a codec's reconstructions; video
direction accuracy, forwards and with the frames played backwards."""

import json

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

from omni.config import load_recipe
from omni.eval import decoding_suffix, evaluate
from omni.io import write_jsonl
from omni.pipeline import pipeline_from_recipe
from omni.tokenizers.audio import AudioCodec


def test_asr_eval_on_originals_and_through_a_codec(tmp_path, text_tokenizer):
    rows = []
    for i in range(3):
        sf.write(tmp_path / f"{i}.wav",
                 (0.1 * np.random.default_rng(i).standard_normal(8000)).astype(np.float32), 16000)
        rows.append({"audio": f"{i}.wav", "text": "turn on the light"})
    write_jsonl(tmp_path / "test.jsonl", rows)
    cfg = load_recipe("whisper/asr_tiny", ["model.size=debug", "model.media.audio.encoder.size=debug",
                                           f"data.path={tmp_path}"])
    run = tmp_path / "run"
    pipeline_from_recipe(cfg, text_tokenizer).save_pretrained(run)
    (run / "recipe.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    torch.manual_seed(0)
    AudioCodec("debug").save(tmp_path / "codec")
    plain = evaluate(run, split="test", max_new_tokens=4)
    coded = evaluate(run, split="test", max_new_tokens=4, through_codec=str(tmp_path / "codec"))
    assert plain["rows"] == coded["rows"] == 3 and plain["wer"] >= 0 and coded["wer"] >= 0
    assert coded["through_codec"] == str(tmp_path / "codec") and "through_codec" not in plain
    assert json.loads((run / "eval_test_codec.json").read_text())["wer"] == coded["wer"]
    assert (run / "eval_test.jsonl").is_file() and (run / "eval_test_codec.jsonl").is_file()
    # the same clips as sounds whose captions are not what was said: no word error rate
    cfg.data.transcript = False
    (run / "recipe.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    sounds = evaluate(run, split="test", max_new_tokens=4)
    assert "wer" not in sounds and "cer" not in sounds and sounds["cider_d"] >= 0


def test_video_eval_also_captions_each_clip_backwards(tmp_path, text_tokenizer, fake_stamps, monkeypatch):
    from omni.data.video import build_video_corpus
    from omni.media.video import Video

    build_video_corpus(tmp_path / "clips", stamps_dir=fake_stamps, size=32, fps=4, duration=1.0)
    cfg = load_recipe("videollama/caption_tiny", ["model.size=debug", f"data.path={tmp_path / 'clips'}"])
    run = tmp_path / "run"
    pipeline_from_recipe(cfg, text_tokenizer).save_pretrained(run)
    (run / "recipe.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    played_backwards = []
    reversed_ = Video.reversed
    monkeypatch.setattr(Video, "reversed", lambda self: played_backwards.append(self.path) or reversed_(self))
    m = evaluate(run, split="test", max_new_tokens=4)
    assert 0 <= m["direction_accuracy"] <= 1 and 0 <= m["reversed_direction_accuracy"] <= 1
    assert len(played_backwards) == m["rows"] > 0



@pytest.mark.parametrize("split", ["../x", "../../outside", "a/b", ".hidden", "", "test\n", "/abs"])
def test_a_split_that_is_not_a_plain_name_is_refused_before_anything_is_read_or_written(tmp_path, split):
    """The split names ``<data>/<split>.jsonl`` and the run's ``eval_<split>.json``: ``../x`` would
    reach outside both folders."""
    (tmp_path / "run").mkdir()
    with pytest.raises(ValueError, match="split must be a plain name") as e:
        evaluate(tmp_path / "run", split=split)
    assert repr(split) in str(e.value)
    assert [p.name for p in tmp_path.rglob("*")] == ["run"]


def test_plain_split_names_pass():
    from omni.config import split_name

    for split in ("test", "test_piper", "val-2", "v1.0", "2024"):
        assert split_name(split) == split


def _run_of(recipe: str, overrides: list[str], tokenizer, run):
    cfg = load_recipe(recipe, ["model.size=debug", *overrides])
    pipeline_from_recipe(cfg, tokenizer).save_pretrained(run)
    (run / "recipe.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    return run


@pytest.mark.parametrize("recipe", ["text/tiny", "audiolm/continue_tiny", "audiolm/speak_tiny"])
def test_max_rows_scores_only_the_first_rows_and_says_so(tmp_path, text_tokenizer, tiny_corpus, recipe):
    """``omni eval --max-rows N`` on a loss-scored task: the scores are those of the first N rows alone,
    and ``rows`` says N (it used to score every row while saying N)."""
    data = tmp_path / "data"
    data.mkdir()
    overrides = [f"data.path={data}"]
    if recipe == "text/tiny":
        rows = [json.loads(x) for x in (tiny_corpus / "val.jsonl").read_text().splitlines()][:8]
        key = "loss"
    else:
        torch.manual_seed(0)
        AudioCodec("debug").save(tmp_path / "codec")
        rows = []
        for i in range(8):
            wave = 0.2 * np.sin(np.arange(960) * (0.05 + 0.02 * i))
            sf.write(data / f"{i}.wav", wave.astype(np.float32), 16000)
            rows.append({"audio": f"{i}.wav", "text": f"turn on light {i}"})
        overrides += [f"codec.path={tmp_path / 'codec'}", "data.max_audio_s=0.05", "data.seq_len=96",
                      "model.max_seq_len=96"]
        key = "code_loss"
    write_jsonl(data / "test.jsonl", rows)
    write_jsonl(data / "first.jsonl", rows[:3])
    write_jsonl(data / "train.jsonl", rows)  # the codes tasks' unigram baseline
    run = _run_of(recipe, overrides, text_tokenizer, tmp_path / "run")
    some = evaluate(run, split="test", max_rows=3, examples=0)
    first = evaluate(run, split="first", examples=0)
    every = evaluate(run, split="test", examples=0)
    assert some["rows"] == first["rows"] == 3 and every["rows"] == 8
    assert some[key] == pytest.approx(first[key]) and some[key] != pytest.approx(every[key])


def test_max_rows_limits_contrastive_pairs(tmp_path, text_tokenizer, fake_stamps):
    from omni.data.images import build_images_corpus

    build_images_corpus(tmp_path / "images", stamps_dir=fake_stamps, max_size=48, val_fraction=0.0,
                        test_fraction=0.0)
    overrides = [f"data.path={tmp_path / 'images'}", "model.media.image.tokenizer.size=debug"]
    run = _run_of("clip/images_tiny", overrides, text_tokenizer, tmp_path / "run")
    every = evaluate(run, split="train")
    some = evaluate(run, split="train", max_rows=2)
    assert every["pairs"] == every["rows"] > 2 and some["pairs"] == some["rows"] == 2


def test_a_checkpoint_without_a_recipe_is_scored_on_the_task_and_data_named(tmp_path, write_gguf):
    """An imported checkpoint has no recipe.yaml: ``task`` and ``data_path`` say what to score."""
    import omni

    ckpt = tmp_path / "ckpt"
    omni.import_hf(write_gguf(tmp_path / "tiny.gguf")).save_pretrained(ckpt)
    rows = [{"messages": [{"role": "user", "content": f"Tell me about {w}."},
                          {"role": "assistant", "content": f"{w} is a word."}]}
            for w in ("cats", "dogs", "mats")]
    write_jsonl(tmp_path / "chat" / "val.jsonl", rows)
    with pytest.raises(ValueError, match="no recipe.yaml.*--task chat --data"):
        evaluate(ckpt, split="val")
    metrics = evaluate(ckpt, split="val", task="chat", data_path=str(tmp_path / "chat"))
    assert metrics["task"] == "chat" and metrics["ppl"] > 1


def test_a_split_in_shards_in_several_folders_scores_as_the_file_it_was_cut_from(tmp_path, text_tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "clips").mkdir()
    rows = []
    for i in range(4):
        sf.write(tmp_path / "clips" / f"{i}.wav",
                 (0.1 * np.random.default_rng(i).standard_normal(8000)).astype(np.float32), 16000)
        rows.append({"audio": f"clips/{i}.wav", "text": "turn on the light"})
    write_jsonl(tmp_path / "test.jsonl", rows)
    for k in range(2):  # data/test/<k>/rows.parquet, media paths relative to each shard's folder
        (tmp_path / "test" / str(k)).mkdir(parents=True)
        shard = [{**r, "audio": f"../../{r['audio']}"} for r in rows[2 * k:2 * k + 2]]
        pq.write_table(pa.Table.from_pylist(shard), tmp_path / "test" / str(k) / "rows.parquet")
    scores = {}
    for name, files in (("one", "{split}.jsonl"), ("shards", "{split}/*/rows.parquet")):
        cfg = load_recipe("whisper/asr_tiny", ["model.size=debug", "model.media.audio.encoder.size=debug",
                                               f"data.path={tmp_path}", f"data.files={files}"])
        run = tmp_path / name
        torch.manual_seed(0)
        pipeline_from_recipe(cfg, text_tokenizer).save_pretrained(run)
        (run / "recipe.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
        scores[name] = evaluate(run, split="test", max_new_tokens=4, examples=0)
    assert scores["one"]["rows"] == scores["shards"]["rows"] == 4
    assert scores["one"]["wer"] == scores["shards"]["wer"]


def test_decoding_names_the_kept_predictions():
    """The suffix evaluate (and benchmarks/speechllm_wer.py, which reads the files back) gives a beam
    search's and a joint CTC decoding's predictions; greedy has none."""
    assert decoding_suffix() == decoding_suffix(1, 0.0) == ""
    assert decoding_suffix(4) == "_beam4"
    assert decoding_suffix(4, 0.5) == "_beam4_ctc0.5"
    assert decoding_suffix(1, 1.0) == "_beam1_ctc1"


def test_a_training_checkpoint_is_scored_under_its_runs_recipe(lora_run):
    """``omni eval --ckpt RUN/checkpoints/step_N``: a step of a run scored as the run would be (to pick a
    step on a validation split): the newest step scores what the exported run scores, an earlier step
    differs, and the results go into the checkpoint's folder, not the run's."""
    from omni.cli import main

    run = lora_run
    first, last = run / "checkpoints" / "step_00000001", run / "checkpoints" / "step_00000002"
    exported = evaluate(run, split="val", max_rows=4, examples=0)
    assert main(["eval", "--ckpt", str(last), "--split", "val", "--max-rows", "4"]) == 0
    assert json.loads((last / "eval_val.json").read_text())["ppl"] == pytest.approx(exported["ppl"], rel=1e-4)
    earlier = evaluate(first, split="val", max_rows=4, examples=0)
    assert earlier["checkpoint"] == str(first) and earlier["ppl"] != pytest.approx(exported["ppl"], rel=1e-4)
    assert not (first / "README.md").exists() and (run / "README.md").is_file()
    state = json.loads((first / "trainer_state.json").read_text())
    del state["recipe"]
    (first / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(ValueError, match="trainer_state.json: no recipe"):
        evaluate(first, split="val")
