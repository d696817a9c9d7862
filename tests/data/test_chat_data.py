"""The chat corpus (Wikipedia titles asked about, lead paragraphs as answers), the ``chat`` task
(loss on assistant turns only) and the text/chat_tiny recipe run from a text/tiny run."""

from __future__ import annotations

import re

import pytest

import omni
from omni.cli import main
from omni.data.chat import QUESTIONS, build_chat_corpus, capped, question
from omni.data.images import split_of
from omni.data.tasks import TaskDataset, TaskSpec, collate
from omni.io import read_jsonl, write_jsonl
from omni.model.backbone import backbone_config
from omni.model.omni_model import build_model
from omni.pipeline import Pipeline
from omni.sequence import IGNORE

SPLITS = ("train", "val", "test")


def _manifests(out):
    return {s: list(read_jsonl(out / f"{s}.jsonl")) for s in SPLITS}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("chat") / "data"
    counts = build_chat_corpus(out, max_rows=300, max_chars=400, val_fraction=0.1, test_fraction=0.1)
    return out, counts


def test_rows_ask_about_a_title_and_answer_with_its_lead_paragraph(corpus):
    out, counts = corpus
    m = _manifests(out)
    assert counts == {s: len(rows) for s, rows in m.items()} and sum(counts.values()) == 300
    assert min(counts.values()) >= 10
    patterns = [re.compile(re.escape(q).replace(re.escape("{}"), "(.+)") + "$") for q in QUESTIONS]
    used = set()
    for split, rows in m.items():
        for r in rows:
            user, assistant = r["messages"]
            assert user["role"] == "user" and assistant["role"] == "assistant"
            assert 60 <= len(assistant["content"]) <= 400 and assistant["content"][-1] in ".!?"
            assert user["content"] == question(r["id"])
            used |= {i for i, p in enumerate(patterns) if p.match(user["content"])}
            assert split_of(r["id"], 0.1, 0.1) == split  # by the title's hash, as the text corpus splits
    assert used == set(range(len(QUESTIONS)))
    train = {r["id"] for r in m["train"]}
    assert train and not train & {r["id"] for s in ("val", "test") for r in m[s]}
    assert question("Belt (clothing)").count("Belt") == 1 and "(" not in question("Belt (clothing)")


def test_splits_are_stable_as_the_corpus_grows(corpus, tmp_path):
    out, _ = corpus
    build_chat_corpus(tmp_path / "small", max_rows=100, max_chars=400, val_fraction=0.1, test_fraction=0.1)
    small, big = _manifests(tmp_path / "small"), _manifests(out)
    for s in SPLITS:
        assert {r["id"] for r in small[s]} <= {r["id"] for r in big[s]}


def test_answers_are_cut_to_whole_sentences():
    text = "First one. Second one is longer!  Third?"
    assert capped(text, 100) == "First one. Second one is longer! Third?"
    assert capped(text, 33) == "First one. Second one is longer!"
    assert capped(text, 5) == ""
    with pytest.raises(ValueError, match="max_chars=10 is below min_chars=60"):
        build_chat_corpus("unused", max_chars=10)


def test_cli_builds_the_corpus(tmp_path, capsys):
    assert main(["data", "build", "chat", "--out", str(tmp_path / "c"), "--max-rows", "40"]) == 0
    out = capsys.readouterr().out
    assert sum(int(n) for n in re.findall(r"(\d+) conversations", out)) == 40
    assert (tmp_path / "c" / "train.jsonl").is_file()


def test_chat_task_puts_loss_on_assistant_tokens_only(text_tokenizer, tmp_path):
    model = Pipeline(build_model(backbone_config("debug"), text_tokenizer.vocab, seed=0),
                     tokenizer=text_tokenizer)
    rows = [{"messages": [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "Tell me about zero."},
                          {"role": "assistant", "content": "Zero is a number."},
                          {"role": "user", "content": "And one?"},
                          {"role": "assistant", "content": "One is the first natural number."}]},
            {"messages": [{"role": "user", "content": "No answer here."}]},  # nothing to learn: skipped
            {"messages": "not a list"},
            {"messages": [{"role": "robot", "content": "Beep."}, {"role": "assistant", "content": "Hi."}]},
            {"messages": [{"role": "user", "content": "What is two?"},
                          {"role": "assistant", "content": "Two."}]}]
    write_jsonl(tmp_path / "train.jsonl", rows)
    ds = TaskDataset(tmp_path / "train.jsonl", TaskSpec("chat"), model, seq_len=128)
    assert ds.num_bad == 3 and ds.num_docs == 2 and len(ds) == 1  # whole conversations share a row
    batch = collate([ds[0]])
    ids, targets = batch["input_ids"][0], batch["targets"][0]
    learned = targets[targets != IGNORE].tolist()
    eot = text_tokenizer.vocab.id("<|eot|>")
    assert learned.count(eot) == 3  # each assistant turn ends with its end of turn
    said = text_tokenizer.decode([t for t in learned if t != eot])
    assert said.replace(" ", "") == "Zeroisanumber.Oneisthefirstnaturalnumber.Two."
    # every learned token is the next token of the row, and no user or system text is learned
    keep = targets != IGNORE
    assert (targets[:-1][keep[:-1]] == ids[1:][keep[:-1]]).all()
    assert "Tell" not in text_tokenizer.decode(learned) and "Be brief" not in text_tokenizer.decode(learned)
    out = model(batch["input_ids"], positions=batch["positions"], targets=batch["targets"],
                doc_ids=batch["doc_ids"])
    assert out.num_tokens == len(learned)


def test_chat_recipe_tunes_a_text_run_and_chats(corpus, text_tokenizer, tmp_path, capsys):
    data, _ = corpus
    text_tokenizer.save(tmp_path / "tok")
    common = [f"tokenizer.path={tmp_path / 'tok'}", "model.size=debug", "train.steps=2",
              "train.warmup_steps=1", "train.batch_size=2", "train.eval_every=2", "train.eval_batches=1",
              "train.progress=false"]
    write_jsonl(tmp_path / "text" / "train.jsonl", [{"id": r["id"], "text": r["messages"][1]["content"]}
                                                    for r in read_jsonl(data / "train.jsonl")])
    (tmp_path / "text" / "val.jsonl").write_text((tmp_path / "text" / "train.jsonl").read_text())
    assert main(["train", "text/tiny", *common, f"data.path={tmp_path / 'text'}",
                 f"train.out_dir={tmp_path / 'text_tiny'}"]) == 0
    assert main(["train", "text/chat_tiny", *common, f"data.path={data}",
                 f"train.out_dir={tmp_path / 'chat'}", f"train.init_from={tmp_path / 'text_tiny'}"]) == 0
    assert "trained text/chat_tiny: 2 steps" in capsys.readouterr().out
    assert main(["eval", "--ckpt", str(tmp_path / "chat"), "--max-rows", "4"]) == 0  # on assistant turns
    assert re.match(r"chat: perplexity \d+\.\d+ \(4 rows\)", capsys.readouterr().out)
    model = omni.load(tmp_path / "chat")
    assert isinstance(omni.Chat(model)("Tell me about zero.", max_new_tokens=4), str)
