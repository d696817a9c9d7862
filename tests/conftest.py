import os

import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never reach a hub
torch.manual_seed(0)


# --- shared fixtures for the unit tests (tests/ mirrors omni/) ---------------------------------

import json

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

CORPUS_DOCS = 300  # the first 300 Wikipedia summaries (sorted by title)
CORPUS_VAL_DOCS = 20  # the last 20 of them go to val.jsonl
TOKENIZER_VOCAB = 512


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """A directory with ``train.jsonl`` (280 docs) and ``val.jsonl`` (20 docs) of real English text."""
    from omni.data.text import wiki_documents

    docs = wiki_documents()[:CORPUS_DOCS]
    assert len(docs) == CORPUS_DOCS
    out = tmp_path_factory.mktemp("tiny_corpus")
    for name, rows in (("train", docs[:-CORPUS_VAL_DOCS]), ("val", docs[-CORPUS_VAL_DOCS:])):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                           encoding="utf-8")
    return out


@pytest.fixture(scope="session")
def text_tokenizer(tiny_corpus):
    """A SentencePiece tokenizer (512 pieces) trained once on ``tiny_corpus/train.jsonl``."""
    from omni.tokenizers.text import TextTokenizer

    lines = (tiny_corpus / "train.jsonl").read_text(encoding="utf-8").splitlines()
    return TextTokenizer.train([json.loads(line)["text"] for line in lines], vocab_size=TOKENIZER_VOCAB, seed=0)


@pytest.fixture(scope="session")
def debug_model(text_tokenizer):
    """The ``debug`` backbone with tied embeddings, seeded; in eval mode. Do not modify it in a test."""
    from omni.model.backbone import backbone_config
    from omni.model.omni_model import build_model

    return build_model(backbone_config("debug"), text_tokenizer.vocab, text_tokenizer, seed=0).eval()


@pytest.fixture(scope="session")
def sampling_model(text_tokenizer):
    """An untied ``debug`` model: its greedy output varies from step to step (a freshly initialised
    tied model mostly repeats its last token), so decoding tests can tell steps apart. Do not modify it."""
    from omni.model.backbone import backbone_config
    from omni.model.omni_model import build_model

    return build_model(backbone_config("debug"), text_tokenizer.vocab, text_tokenizer, tie_embeddings=False,
                       seed=0).eval()
