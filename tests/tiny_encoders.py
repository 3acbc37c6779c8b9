"""Tiny encoder models built in the test session (no downloads), saved as safetensors folders:
a reward model (a random BERT with a character WordPiece vocabulary) and a UniEval-style T5
(word-level tokenizer with single "Yes", "No" and "</s>" tokens, pad 0, eos 1)."""

from __future__ import annotations

import re
import string
from pathlib import Path
from typing import Iterable


def build_tiny_rm(folder: Path) -> Path:
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    chars = string.ascii_lowercase + string.digits + ".,!?;:'-()"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *[f"##{c}" for c in chars],
             "the", "a", "of", "is", "and"]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), do_lower_case=True)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512, num_labels=1)
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(folder)  # safetensors
    tok.save_pretrained(folder)
    return folder


def build_tiny_t5(folder: Path, texts: Iterable[str]) -> Path:
    """`texts`: the words the vocabulary holds besides UniEval's prompts (others become <unk>)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

    from tamis.runtime.unieval import unieval_input

    words = set()
    for d in ("naturalness", "coherence", "understandability"):
        words |= set(re.findall(r"\w+|[^\w\s]+", unieval_input(d, "", "")))
    for text in texts:
        words |= set(re.findall(r"\w+|[^\w\s]+", text or ""))
    words -= {"<", "</", ">", "s", "/"}
    vocab = ["<pad>", "</s>", "<unk>", "Yes", "No", *sorted(words - {"Yes", "No"})]
    vocab += ["<", "/", ">", "s"]
    ids = {w: i for i, w in enumerate(dict.fromkeys(vocab))}
    tk = Tokenizer(models.WordLevel(ids, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(ids), d_model=32, d_ff=64, d_kv=16, num_layers=2, num_heads=2,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    model = T5ForConditionalGeneration(config).eval()
    model.save_pretrained(folder)  # safetensors
    tok.save_pretrained(folder)
    return folder
