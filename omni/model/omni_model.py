"""``OmniModel``: token embeddings + backbone + output head, with save/load.

A checkpoint directory holds ``config.json`` (backbone + vocabulary layout + media encoders) and
``model.safetensors`` (every weight, pretrained media towers included), the model's files; beside
them the processor's (``tokenizer/``, ``codec/``, see :mod:`omni.processor`): the folder travels
on its own.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from omni.io import atomic_dir, atomic_write_json, load_tensors, save_tensors
from omni.model.backbone import NO_SLOT, Backbone, BackboneConfig, KVCache, Memory
from omni.model.blip2 import Blip2Config, Blip2Head
from omni.model.contrastive import ContrastiveConfig, ContrastiveHead
from omni.model.head import LMHead, summed_cross_entropy
from omni.model.lora import merged_state_dict
from omni.model.media_encoder import build_media_encoder
from omni.model.outputs import ModelOutput, default_positions
from omni.sequence import IGNORE, MediaSlot
from omni.vocab import Vocab

log = logging.getLogger(__name__)


def bf16_is_emulated(device: torch.device | str) -> bool:
    """Whether bfloat16 matmuls on ``device`` are emulated: a CPU for which oneDNN has no bfloat16
    kernels (AVX2 alone, without AVX512 or AMX). There bfloat16 is many times slower than float32
    (SmolLM2's layer shapes on a 2-core AVX2 EPYC: 19 against 160 GFLOP/s)."""
    return torch.device(device).type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported()


CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1


@dataclass
class OmniConfig:
    """backbone + vocabulary layout; ``media`` maps a modality to its encoder/connector config
    (``omni.model.media_encoder``); ``audio_pattern`` lays out audio codes (``delay``/``flatten``)."""

    backbone: BackboneConfig
    vocab: Vocab
    tie_embeddings: bool = True
    media: dict = field(default_factory=dict)
    audio_pattern: str = "delay"
    # {embed_dim, temperature}: a contrastive head (omni/model/contrastive.py)
    contrastive: dict | None = None
    blip2: dict | None = None  # {itc, itm, itg, embed_dim, temperature}: BLIP-2 stage 1 (omni/model/blip2.py)

    def to_dict(self) -> dict:
        return {"model_type": "omni", "format_version": FORMAT_VERSION, "backbone": self.backbone.to_dict(),
                "vocab": self.vocab.to_dict(), "tie_embeddings": self.tie_embeddings, "media": self.media,
                "audio_pattern": self.audio_pattern, "contrastive": self.contrastive,
                "blip2": self.blip2}

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> OmniConfig:
        if not isinstance(d, dict) or d.get("model_type") != "omni":
            found = d.get("model_type") if isinstance(d, dict) else type(d).__name__
            raise ValueError(f"{source}: not an omni config (model_type={found!r})")
        try:
            return cls(BackboneConfig(**d["backbone"]), Vocab.from_dict(d["vocab"]),
                       bool(d.get("tie_embeddings", True)),
                       dict(d.get("media", {})), str(d.get("audio_pattern", "delay")), d.get("contrastive"),
                       d.get("blip2"))
        except (KeyError, TypeError, ValueError) as e:  # ValueError: values the config classes reject
            raise ValueError(f"{source}: malformed omni config ({e})") from None


class OmniModel(nn.Module):
    def __init__(self, config: OmniConfig):
        super().__init__()
        self.config = config
        self.vocab = config.vocab
        cfg = config.backbone
        self.embed = nn.Embedding(config.vocab.size, cfg.dim)
        self.backbone = Backbone(cfg)
        self.lm_head = LMHead(cfg.dim, config.vocab.size)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        # in training the head and its loss are fused (LMHead.loss), over this many rows at a time
        # (train.loss_chunk; 0: all at once)
        self.loss_chunk = 0
        self.encoders = nn.ModuleDict()
        if config.media:
            for modality, mcfg in config.media.items():
                self.encoders[modality] = build_media_encoder(modality, mcfg, cfg.dim, config.vocab.text_size)
        video = getattr(self.encoders["video"], "video", None) if "video" in self.encoders else None
        if video is not None and self.reads_by_cross_attention("video") and video.temporal == "mrope":
            raise ValueError("model.media.video: with model.cross_attention the video is read as a memory "
                             "without positions, so `temporal: mrope` would lose the order of the frames; "
                             "use `video: {temporal: qformer}` (learned frame positions before a video "
                             "Q-Former), or keep the video as tokens by leaving it out of "
                             "model.cross_attention.media")
        self.contrastive = None
        if config.contrastive is not None:
            cc = ContrastiveConfig.parse(config.contrastive)
            self.contrastive = ContrastiveHead(cfg.dim, list(config.media), cc.embed_dim, cc.temperature)
        self.blip2 = None
        if config.blip2 is not None:
            self.blip2 = Blip2Head(cfg.dim, Blip2Config.parse(config.blip2))
        self._every_tower = False
        # train.loss: aux (a trainer sets it): the loss is the media encoders' auxiliary loss alone
        # (a connector's CTC stage); no language-model forward runs
        self.aux_only = False

    @property
    def every_tower(self) -> bool:
        """Whether every forward (training and evaluation) runs every media tower, on a dummy input
        (``MediaEncoder.dummy``) where the batch holds none of its modality, at zero weight. The
        trainer sets it when it runs on several processes: under FSDP a rank that skipped a tower
        would leave the others waiting in its all-gather, and under DDP in its gradient all-reduce.
        The dummy's features are multiplied by 0, so its gradient is zero and the update that of
        the real media alone."""
        return self._every_tower

    @every_tower.setter
    def every_tower(self, on: bool) -> None:
        self._every_tower = on
        for encoder in self.encoders.values():
            encoder.always_aux = on

    # -- construction -----------------------------------------------------------------------

    def reset_parameters(self, std: float = 0.02) -> None:
        self.backbone.reset_parameters(std)
        nn.init.normal_(self.embed.weight, 0.0, std)
        if not self.config.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, 0.0, std)
        self.match_media_scale()

    @torch.no_grad()
    def match_media_scale(self) -> None:
        """Connectors with ``norm: true`` emit tokens at the RMS of the text embeddings (their
        output gain); called after the embeddings are initialised or loaded from a pretrained LM."""
        rms = self.embed.weight[:self.config.vocab.text_size].float().pow(2).mean().sqrt().item()
        for encoder in self.encoders.values():
            encoder.connector.match_scale(rms)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def uses_mrope(self) -> bool:
        """Whether positions are 3-D (time, height, width) for media spans."""
        return self.config.backbone.mrope_section is not None

    def idle_parameters(self, absent: set[str]) -> list[nn.Parameter]:
        """The parameters that a batch without ``absent``'s media leaves out of the graph on one
        process: those modalities' towers, and the cross-attention blocks when every modality they
        read is absent. With :attr:`every_tower` they get zero gradients instead, and AdamW moves a
        parameter with a zero gradient (momentum, weight decay) but skips one without: a trainer on
        several processes sets theirs back to None where no process had the media."""
        params = [p for m in sorted(absent & set(self.encoders)) for p in self.encoders[m].parameters()]
        if len(self.backbone.cross) and all(not self.reads_by_cross_attention(m) or m in absent
                                            for m in self.encoders):
            params += list(self.backbone.cross.parameters())
        return params

    def reads_by_cross_attention(self, modality: str) -> bool:
        """Whether the backbone's cross-attention blocks read ``modality``'s features (else they
        take ``<|feat|>`` slots in the sequence), see ``BackboneConfig.cross_attention``."""
        xa = self.config.backbone.cross_attention
        return xa is not None and (xa["media"] is None or modality in xa["media"])

    def render_options(self) -> dict:
        """What :func:`omni.sequence.render` needs to know about this model."""
        return dict(vocab=self.vocab, audio_pattern=self.config.audio_pattern, mrope=self.uses_mrope,
                    media_tokens={m for m in self.encoders if not self.reads_by_cross_attention(m)})

    @property
    def max_seq_len(self) -> int:
        return self.config.backbone.max_seq_len

    def cast(self, dtype: torch.dtype) -> OmniModel:
        """Cast the text path (embeddings, backbone, heads) to ``dtype`` for inference (``omni serve
        --dtype bfloat16``). The media towers keep their dtype (their features are cast where they
        join the sequence), the rotary tables stay float32 and the norms normalise in float32."""
        if dtype == torch.bfloat16 and bf16_is_emulated(self.device):
            log.warning("bfloat16 on this CPU is emulated (no AVX512 or AMX): it runs several times "
                        "slower than float32 here")
        for name, child in self.named_children():
            if name != "encoders":
                child.to(dtype)
        self.backbone.rotary.float()
        self.backbone.rotary.reset_buffers()
        return self

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- forward ----------------------------------------------------------------------------

    def forward(self, input_ids: torch.Tensor, *, positions: torch.Tensor | None = None,
                targets: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None,
                key_padding: torch.Tensor | None = None, cache: KVCache | None = None,
                streams: torch.Tensor | None = None, stream_targets: torch.Tensor | None = None,
                media: list | None = None, last_only: bool = False,
                loss_weights: torch.Tensor | None = None) -> ModelOutput:
        """input_ids (B, T); targets (B, T) next-token ids or -100 (already shifted, see sequence.render).

        positions: (B, T) or (3, B, T); default 0..T-1 after ``cache.length``, counting only real
        tokens when ``key_padding`` marks left padding. streams / stream_targets (B, K-1, T): the
        delay layout's codebooks 1..K-1 (EMPTY / -100 where a step has none). media: ``(row,
        MediaSlot)`` pairs whose encoder outputs replace the ``<|feat|>`` embeddings, or become the
        cross-attention memory. last_only: logits for the last position only. With ``targets``
        the logits are those of the positions that carry one, ``(N, V)`` (``ModelOutput.kept``
        marks them), or None in training, and wherever ``loss_chunk`` is set, where the head is
        fused with its loss (``LMHead.loss``, ``loss_chunk`` rows at a time) and its logits are
        never kept. loss_weights (B, T): each position's weight in the loss (a mixture's per-task
        ``loss_weight``); the loss is then the weighted mean over the targets, codebook streams
        included. (The loss on (media, text) pairs is
        :class:`omni.model.objectives.PairObjective`'s, a module around the model.)
        """
        if positions is None:
            positions = default_positions(input_ids, key_padding, cache)
        x = self.embed_ids(input_ids, streams)
        aux_loss = aux_mass = memory = None
        if media or self.every_tower:
            encoded, aux_loss, aux_mass = self.encode_media(media or [], self.every_tower)
        if self.aux_only and targets is not None:  # the encoders' loss alone: the LM does not run
            if aux_loss is None:
                raise ValueError("train.loss=aux trains on the media encoders' auxiliary loss (CTC), but "
                                 "this batch has no clip with a transcript, or no encoder has one")
            return ModelOutput(None, aux_loss, int(aux_mass), loss_mass=aux_mass)
        if media or self.every_tower:
            placed = [e for e in encoded if not self.reads_by_cross_attention(e[1].modality)]
            read = [e for e in encoded if self.reads_by_cross_attention(e[1].modality)]
            for _, slot, f in [e for e in placed if e[1].start == NO_SLOT]:  # an idle tower's zeros
                x = x + f.sum().to(x.dtype)
            placed = [e for e in placed if e[1].start != NO_SLOT]
            if placed:
                x = self._place(x, placed)
            if read:  # an idle tower's column has start NO_SLOT: no token reads it
                memory = self._memory(read, input_ids.shape[0], doc_ids)
        h = self.backbone(x, positions, doc_ids=doc_ids, key_padding=key_padding, cache=cache, memory=memory)
        assert not (last_only and targets is not None), "last_only is for inference"
        if targets is None:
            return ModelOutput(self.lm_head(h[:, -1:] if last_only else h))  # a prompt pass needs one row
        # the head runs only where a target is (text or any codebook stream): in SFT the prompt and
        # padding carry none, and the head over a 49k vocabulary is a fifth of the model's FLOPs
        kept = targets != IGNORE
        if stream_targets is not None:
            kept = kept | (stream_targets != IGNORE).any(1)
        # (N, K) targets: text over the whole vocabulary, then each codebook stream's relative to its range
        columns, ranges = [targets[kept]], [(0, self.vocab.size)]
        if stream_targets is not None:
            for k, part in enumerate(stream_targets.transpose(1, 2)[kept].unbind(1)):  # codebook k+1
                r = self.vocab.codebook_range(k + 1)
                ranges.append((r.start, r.stop))
                columns.append(torch.where(part == IGNORE, IGNORE, part - r.start))
        tgt = torch.stack(columns, 1)
        w = None if loss_weights is None else loss_weights[kept].to(h.device, torch.float32)
        real = tgt != IGNORE  # (N, K): which targets each row carries
        n = int(real.sum())
        mass = n if w is None else (w[:, None] * real).sum()
        hk, logits = h[kept], None
        training = self.training and torch.is_grad_enabled()
        if isinstance(self.lm_head, LMHead) and (training or self.loss_chunk > 0):
            # the head fused with its loss: no (N, V) logits kept for the backward pass (nor returned);
            # with loss_chunk also in a trainer's validation, whose batches are as large
            total = self.lm_head.loss(hk, tgt, ranges, w, self.loss_chunk)
        else:  # evaluation, or a head wrapped by LoRA or quantisation
            logits = self.lm_head(hk)  # (N, V)
            total = summed_cross_entropy(logits, tgt, ranges, w)
        return ModelOutput(logits, total / mass if n else total, n, aux_loss, kept=kept, aux_mass=aux_mass,
                           loss_mass=torch.as_tensor(mass if n else 0, dtype=torch.float32))

    def decode_step(self, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """The logits ``(B, V)`` after one new id per row, ``ids (B, 1)`` at ``positions``, on a
        static cache (:meth:`Backbone.decode`, what ``generate(..., compile=True)`` compiles);
        the caller advances the cache."""
        return self.lm_head(self.backbone.decode(self.embed(ids), positions, cache))[:, -1]

    def embed_ids(self, input_ids: torch.Tensor, streams: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings (B, T, D): stream 0 plus the delay streams, summed (EMPTY ids add nothing)."""
        x = self._embed_ids(input_ids)
        if streams is not None:
            for k in range(streams.shape[1]):
                x = x + self._embed_ids(streams[:, k])
        return x

    def encode_media(self, media: list, every_tower: bool = False
                     ) -> tuple[list, torch.Tensor | None, torch.Tensor | None]:
        """``(row, slot)`` pairs -> ``(row, slot, features (slot.length, D))`` triples, one batched
        encoder call per modality, in the model's order of encoders (the same on every process),
        and the encoders' auxiliary loss when training on slots that carry ``labels`` (else None)
        with its mass, the number of labelled clips it is a mean over (a trainer on several processes
        weights each one's mean by it, as it does the token loss by ``loss_mass``).
        ``every_tower``: an encoder whose modality the batch lacks runs on its dummy input, giving a
        triple of zero features at a slot that starts at ``NO_SLOT`` (see :attr:`every_tower`)."""
        aux_loss, aux_mass, encoded = None, None, []
        for modality in sorted({slot.modality for _, slot in media} - set(self.encoders)):
            raise ValueError(f"this model has no {modality} encoder; it reads: "
                             f"{', '.join(['text', *self.encoders]) }")
        for modality, encoder in self.encoders.items():
            items = [(row, slot) for row, slot in media if slot.modality == modality]
            idle = every_tower and not items
            if idle:  # a slot no token reads (start NO_SLOT), for the dummy input
                items = [(0, MediaSlot(NO_SLOT, 0, modality, encoder.dummy()))]
            elif not items:
                continue
            labels = [slot.labels for _, slot in items] if self.training or self.aux_only else None
            datas = [slot.data.to(self.device) for _, slot in items]
            outs, aux = encoder.encode(datas, labels, self.embed.weight)
            if aux is not None:
                aux_loss = aux if aux_loss is None else aux_loss + aux
                clips = torch.tensor(float(sum(lab is not None for lab in labels)))
                aux_mass = clips if aux_mass is None else aux_mass + clips
            if idle:
                encoded.append((0, dataclasses.replace(items[0][1], length=outs[0].shape[0]), outs[0] * 0))
                continue
            for (row, slot), f in zip(items, outs):
                if f.shape[0] != slot.length:
                    raise ValueError(f"the {modality} encoder gave {f.shape[0]} tokens for a slot of "
                                     f"{slot.length}")
                encoded.append((row, slot, f))
        return encoded, aux_loss, aux_mass

    @staticmethod
    def _place(x: torch.Tensor, encoded: list) -> torch.Tensor:
        """Write each slot's features over its ``<|feat|>`` embeddings."""
        rows = torch.cat([torch.full((s.length,), row, dtype=torch.long) for row, s, _ in encoded])
        cols = torch.cat([torch.arange(s.start, s.start + s.length) for _, s, _ in encoded])
        feats = torch.cat([f.to(x.dtype) for _, _, f in encoded])
        return x.index_put((rows.to(x.device), cols.to(x.device)), feats)

    def _memory(self, encoded: list, B: int, doc_ids: torch.Tensor | None) -> Memory:
        """Each row's slot features side by side, (B, M, D), for the cross-attention blocks."""
        per_row: list[list] = [[] for _ in range(B)]
        for row, slot, f in sorted(encoded, key=lambda e: (e[0], e[1].start)):
            per_row[row].append((slot, f))
        M = max(sum(s.length for s, _ in r) for r in per_row)
        D = encoded[0][2].shape[-1]
        features = torch.zeros(B, M, D, device=self.device, dtype=self.embed.weight.dtype)
        start = torch.full((B, M), NO_SLOT, dtype=torch.long)
        for row, items in enumerate(per_row):
            at = 0
            for slot, f in items:
                features[row, at:at + slot.length] = f.to(features.dtype)
                start[row, at:at + slot.length] = slot.start
                at += slot.length
        start = start.to(self.device)
        doc = None
        if doc_ids is not None:  # each column's document: the one its span's first reader is in
            real = start != NO_SLOT
            doc = torch.where(real, doc_ids.gather(1, torch.where(real, start, 0)), -1)
        return Memory(features, start, doc)

    def _embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.min() >= 0:
            return self.embed(ids)
        return self.embed(ids.clamp(min=0)) * (ids >= 0).unsqueeze(-1).to(self.embed.weight.dtype)

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, T, V) logits for plain text ids."""
        self._check_length(input_ids.shape[1])
        return self(input_ids).logits

    def _check_length(self, n: int, what: str = "input") -> None:
        check_length(n, self.max_seq_len, what)

    # -- files ------------------------------------------------------------------------------

    def save_pretrained(self, path: str | Path) -> Path:
        """Write config.json + model.safetensors atomically (``omni.io.atomic_dir``): a new folder
        appears whole; into an existing one (a run folder) each of ours is swapped in by an atomic
        rename, config.json last, and what we do not own (metrics, checkpoints/) stays. A
        pipeline's ``save_pretrained`` adds the processor's files in the same swap."""
        path = Path(path)
        with atomic_dir(path, merge=True, last=CONFIG_FILE) as tmp:
            self.write_files(tmp)
        return path

    def write_files(self, folder: Path) -> None:
        """config.json + model.safetensors into ``folder`` (a staging folder of ``atomic_dir``)."""
        atomic_write_json(folder / CONFIG_FILE, self.standalone_config().to_dict())
        save_tensors(folder / WEIGHTS_FILE, self.export_state_dict(), metadata={"format": "pt"})

    def standalone_config(self) -> OmniConfig:
        """The config ``save_pretrained`` writes: a media tower loaded from a local folder (a
        ``path`` in ``media``) is described by its own transformers config instead. Its weights are
        in model.safetensors like every other, so the checkpoint loads without that folder."""
        media = {modality: encoder.standalone_config() for modality, encoder in self.encoders.items()}
        return dataclasses.replace(self.config, media=media)

    def export_state_dict(self, merge_lora: bool = True) -> dict[str, torch.Tensor]:
        """The weights to save: LoRA adapters (``train.lora``) folded into their base weights unless
        ``merge_lora=False`` (training checkpoints keep them apart to resume)."""
        if merge_lora:
            sd = merged_state_dict(self)
        else:
            sd = dict(self.state_dict())
        if self.config.tie_embeddings:
            sd.pop("lm_head.weight", None)  # safetensors stores no aliases; tied on load
        return sd

    def load_weights(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        """Strict load that names the missing, unexpected or mis-shaped tensor. An audio tower saved
        under transformers' names (the old ``hf_whisper`` encoder) is renamed to omni's first."""
        for name, enc in self.encoders.items():
            upgrade = getattr(getattr(enc, "encoder", None), "upgrade_state", None)
            if upgrade is not None:
                tensors = upgrade(tensors, f"encoders.{name}.encoder.")
        own = self.export_state_dict(merge_lora=False)
        missing = sorted(set(own) - set(tensors))
        unexpected = sorted(set(tensors) - set(own))
        if missing or unexpected:
            raise ValueError(f"{source}: weights do not match the config (missing: {missing[:5]}, "
                             f"unexpected: {unexpected[:5]})")
        for k, v in tensors.items():
            if v.shape != own[k].shape:
                raise ValueError(f"{source}: tensor {k} has shape {tuple(v.shape)}, the config needs "
                                 f"{tuple(own[k].shape)}")
        self.load_state_dict(tensors, strict=False)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> OmniModel:
        path = Path(path)
        config, weights = read_config(path), path / WEIGHTS_FILE
        if config.media:  # media towers have their own buffers and loaders: build them for real
            model = cls(config).to(device)
        else:
            with torch.device("meta"):
                model = cls(config)
            model.to_empty(device=device)
            model.backbone.rotary.reset_buffers()  # non-persistent: not in the file, garbage after to_empty
            if config.tie_embeddings:
                model.lm_head.weight = model.embed.weight
        model.load_weights(load_tensors(weights), str(weights))
        model.backbone.set_attn_backend(config.backbone.attn_backend, torch.device(device))
        return model.eval()


def read_config(path: str | Path) -> OmniConfig:
    """The config of the checkpoint folder ``path``; a missing folder or file, or a config that is
    not valid, is a ``ValueError`` naming the file."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path}: checkpoint directory not found")
    cfg_file = path / CONFIG_FILE
    for f in (cfg_file, path / WEIGHTS_FILE):
        if not f.is_file():
            raise ValueError(f"{path}: incomplete checkpoint, {f.name} is missing")
    try:
        raw = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_file}: not valid JSON ({e})") from None
    return OmniConfig.from_dict(raw, source=str(cfg_file))


def check_length(n: int, max_seq_len: int | None, what: str = "input") -> None:
    """Refuse ``n`` tokens over the model's context, naming the config key that sets it."""
    if max_seq_len is not None and n > max_seq_len:
        raise ValueError(f"{what} is {n} tokens but the model's context is {max_seq_len} "
                         "(config backbone.max_seq_len); shorten it")


def build_model(backbone: BackboneConfig, vocab: Vocab, tie_embeddings: bool = True,
                seed: int | None = None, media: dict | None = None, audio_pattern: str = "delay",
                contrastive: dict | None = None, blip2: dict | None = None) -> OmniModel:
    """A freshly initialised model (media encoders keep their own initialisation / loaded towers)."""
    if seed is not None:
        torch.manual_seed(seed)
    config = OmniConfig(backbone, vocab, tie_embeddings, dict(media or {}), audio_pattern, contrastive, blip2)
    model = OmniModel(config)
    model.reset_parameters()
    return model
