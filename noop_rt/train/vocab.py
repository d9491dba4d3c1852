"""Build a real CLIP BPE tokenizer offline, from a word list (no hub download).

The vocabulary holds every byte-level character (so any prompt tokenizes, unknown words fall back to characters),
the end-of-word variant of each, and whole-word tokens for the given words with the merges that form them.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPTokenizer

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"


def build_clip_tokenizer(words: Iterable[str], model_max_length: int) -> CLIPTokenizer:
    """A CLIPTokenizer whose vocabulary knows `words` as single tokens (lower-case ASCII words)."""
    alphabet = sorted(ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for char in alphabet:
        vocab.setdefault(char, len(vocab))
    for char in alphabet:
        vocab.setdefault(char + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    for word in sorted({w.lower() for w in words if w}):
        pieces = [*list(word[:-1]), word[-1] + "</w>"]
        while len(pieces) > 1:  # merge left to right: "s e" -> "se", "se v" -> "sev", ...
            pair = (pieces[0], pieces[1])
            if pair not in merges:
                merges.append(pair)
            pieces = [pair[0] + pair[1], *pieces[2:]]
            vocab.setdefault(pieces[0], len(vocab))
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
