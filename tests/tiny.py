"""Tiny randomly initialised backbones, tokenizers and sentence encoders for fast, exact tests.

Nothing here touches a hub: tokenizers are trained in memory on a fixed text, models are built
from configs with a fixed seed, and the encoder is a 2-layer BERT wrapped as a
sentence-transformers model (mean pooling + normalisation, like all-MiniLM).
"""

from __future__ import annotations

from pathlib import Path

import torch

TEXT = (
    "The movie was wonderful and the acting was great. The film was terrible and boring. "
    "Stocks fell sharply as the market reacted to the bank's report. The team won the match "
    "in the final minute. New phones and computers were shown at the technology fair. "
    "Parliament voted on the new law after a long debate. The singer released a new album. "
) * 4

DOCS = [s.strip() + "." for s in TEXT.split(".") if s.strip()]


def tiny_tokenizer(vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    return fast


def tiny_backbone(kind: str = "llama", seed: int = 0):
    """(model, tokenizer): a 2-layer causal LM of width 32 with the tiny tokenizer."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    if kind == "llama":
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          tie_word_embeddings=True, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                          bos_token_id=tok.eos_token_id)
    elif kind == "gpt2":
        cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=256,
                         eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    else:
        raise ValueError(kind)
    model = AutoModelForCausalLM.from_config(cfg)
    model.eval()
    return model, tok


def save_tiny_backbone(folder: Path, kind: str = "llama") -> Path:
    model, tok = tiny_backbone(kind)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def save_tiny_encoder(folder: Path, dim: int = 16, seed: int = 0) -> Path:
    """A 2-layer BERT sentence encoder saved as a sentence-transformers folder."""
    from sentence_transformers import SentenceTransformer, models
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, trainers
    from tokenizers import models as tok_models
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    tok = Tokenizer(tok_models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator([TEXT], trainers.WordPieceTrainer(
        vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    torch.manual_seed(seed)
    bert = BertModel(BertConfig(vocab_size=len(fast), hidden_size=dim, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=32, max_position_embeddings=128))
    raw = folder / "bert"
    bert.save_pretrained(raw)
    fast.save_pretrained(raw)
    word = models.Transformer(str(raw), max_seq_length=64)
    pool = models.Pooling(word.get_embedding_dimension(), pooling_mode="mean")
    st = SentenceTransformer(modules=[word, pool, models.Normalize()], device="cpu")
    st.save(str(folder))
    return folder
