"""Writes tests/data/ckpt_hf_whisper/: a tiny checkpoint whose audio tower is the transformers-based
``hf_whisper`` encoder as main saved it before issue 25 item 5 rebuilt that tower on omni's own
Whisper encoder (config ``kind: hf_whisper`` with a transformers ``whisper_config`` diff; weights
under transformers' names, ``encoders.audio.encoder.encoder.*``), plus
ckpt_hf_whisper_reference.safetensors: two log-mel inputs and the audio encoder's output features
(connector included) for them.

It was run once, at commit de7b783 (HFWhisperEncoder still in omni/tokenizers/audio.py):
    python tests/data/make_ckpt_hf_whisper.py
tests/model/test_media_encoder.py::test_a_checkpoint_with_the_old_hf_whisper_tower_gives_the_same_features
loads it with today's code. Do not run it again: the point is that the files are old.
"""

from pathlib import Path

import torch
from safetensors.torch import save_file

from omni.model.backbone import backbone_config
from omni.model.omni_model import build_model
from omni.vocab import Vocab

HERE = Path(__file__).parent
OUT = HERE / "ckpt_hf_whisper"

torch.manual_seed(0)
whisper = {"d_model": 32, "encoder_layers": 2, "encoder_attention_heads": 2, "encoder_ffn_dim": 64,
           "max_source_positions": 100, "num_mel_bins": 80}
media = {"audio": {"encoder": {"kind": "hf_whisper", "whisper_config": whisper, "freeze": True,
                               "input_mode": "pad"}, "connector": {"kind": "mlp"}}}
model = build_model(backbone_config("debug"), Vocab(40), seed=0, media=media).eval()
with torch.no_grad():
    for name, p in model.encoders["audio"].encoder.named_parameters():  # every weight random, biases too
        p.normal_(0.0, 0.2)
model.save_pretrained(OUT)
g = torch.Generator().manual_seed(1)
mels = [torch.randn(80, 200, generator=g), torch.randn(80, 120, generator=g)]
with torch.no_grad():
    feats = [model.encoders["audio"]([m])[0] for m in mels]
save_file({"mel0": mels[0], "mel1": mels[1], "feat0": feats[0].contiguous(), "feat1": feats[1].contiguous()},
          str(HERE / "ckpt_hf_whisper_reference.safetensors"))
print(OUT, [tuple(f.shape) for f in feats])
