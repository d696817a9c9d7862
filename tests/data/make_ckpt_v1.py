"""Writes tests/data/ckpt_v1/: a tiny any-to-any checkpoint as omni's format_version 1 saves it
(text tokenizer; image, video and audio encoders; audio read through cross-attention; M-RoPE;
delay-pattern codec codes; a codec), plus ckpt_v1_reference.safetensors: the raw prompt inputs,
the ids they rendered to and the logits the model gave for them.

It was run once, at commit 84cb853 (before the Processor refactor of issue 23):
    python tests/data/make_ckpt_v1.py
tests/model/test_omni_model.py::test_a_checkpoint_from_before_the_processor_refactor_gives_the_same_logits
loads both with today's code. Do not run it again: the point is that the files are old.
"""

from pathlib import Path

import av
import numpy as np
import torch
from safetensors.torch import save_file

import omni
from omni.api import render_prompts
from omni.data.text import wiki_documents
from omni.generation import left_pad
from omni.model.backbone import backbone_config, default_mrope_section
from omni.model.omni_model import build_model
from omni.pipeline import Pipeline
from omni.tokenizers.audio import AudioCodec
from omni.tokenizers.text import TextTokenizer
from omni.vocab import Vocab

HERE = Path(__file__).parent
OUT = HERE / "ckpt_v1"


def write_clip(path: Path, frames: np.ndarray) -> None:
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=4)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for f in frames:
            c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(s.encode(None))


tok = TextTokenizer.train([d["text"] for d in wiki_documents()[:200]], vocab_size=400, seed=0)
codec = AudioCodec("debug")
vocab = Vocab(tok.vocab.text_size, tok.vocab.specials, codec.num_codebooks, codec.cardinality)
media = {
    "audio": {"encoder": {"kind": "whisper_style", "size": "debug", "subsample": 4}, "normalize": "meanvar",
              "ctc_weight": 0.5, "connector": {"kind": "mlp"}},
    "image": {"tokenizer": {"kind": "siglip", "size": "debug", "image_size": 32, "patch_size": 16},
              "connector": {"kind": "mlp"}},
    "video": {"tokenizer": {"kind": "siglip", "size": "debug", "image_size": 32, "patch_size": 16},
              "video": {"num_frames": 2, "temporal": "mrope"}, "connector": {"kind": "mlp"}},
}
bcfg = backbone_config("debug", max_seq_len=1024,
                       cross_attention={"every": 1, "gated": False, "ffn": False, "media": ["audio"]})
bcfg.mrope_section = default_mrope_section(bcfg.head_dim)
Pipeline(build_model(bcfg, vocab, seed=0, media=media), tokenizer=tok, codec=codec).save_pretrained(OUT)
model = omni.load(OUT)

g = torch.Generator().manual_seed(1)
pixels = torch.randint(0, 256, (3, 40, 48), dtype=torch.uint8, generator=g)
clip = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8, generator=g)
wave = 0.1 * torch.randn(16000, generator=g)
speech = 0.1 * torch.randn(3200, generator=g)
write_clip(HERE / "ckpt_v1_clip.mp4", clip.numpy())
ref = {"pixels": pixels, "wave": wave, "speech": speech}
cases = {
    "text_media": ([[omni.Image(pixels), "Caption:"], [omni.Audio(wave, sample_rate=16000), "Transcribe."],
                    [model.encoders["video"].video.load(HERE / "ckpt_v1_clip.mp4"), "Describe."],
                    ["The history of"]], "text"),
    "continue": ([["Continue:", omni.Audio(speech, sample_rate=16000)]], "audio"),
}
with torch.no_grad():
    for name, (batch, output) in cases.items():
        rendered, inputs = render_prompts(model, batch, output)
        ids = left_pad([r.ids for r in rendered], model.vocab.pad_id)[0]
        kw = {k: v for k, v in inputs.items() if k != "attention_mask"}
        ref[f"{name}.ids"] = ids
        ref[f"{name}.logits"] = model(ids, key_padding=inputs["attention_mask"].bool(), **kw).logits
save_file({k: v.contiguous() for k, v in ref.items()}, str(HERE / "ckpt_v1_reference.safetensors"))
print({k: tuple(v.shape) for k, v in ref.items()})
