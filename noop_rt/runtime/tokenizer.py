"""CLIP prompt tokenization for the text-encoder graph with the `tokenizers` library (no transformers): the bundle's
`tokenizer/tokenizer.json`, padded and truncated to the text encoder's length as Stable Diffusion pipelines do
(`padding="max_length", truncation=True`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from noop_rt.runtime.errors import BundleError


class PromptTokenizer:
    def __init__(self, folder: Path, max_tokens: int) -> None:
        from tokenizers import Tokenizer

        path = folder / "tokenizer.json"
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
            config = json.loads((folder / "tokenizer_config.json").read_text())
        except Exception as exc:  # tokenizers raises a bare Exception on a malformed file
            raise BundleError(f"cannot read the tokenizer in {folder}: {str(exc).splitlines()[0]}") from None
        pad = config.get("pad_token")
        pad = pad.get("content") if isinstance(pad, dict) else pad
        pad_id = self.tokenizer.token_to_id(pad) if pad else None
        if pad_id is None:
            raise BundleError(f"{folder}/tokenizer_config.json names pad token {pad!r}, which is not in the vocabulary")
        self.max_tokens = max_tokens
        self.tokenizer.enable_truncation(max_length=max_tokens)
        self.tokenizer.enable_padding(length=max_tokens, pad_id=pad_id, pad_token=pad)

    def __call__(self, prompts: list[str]) -> np.ndarray:
        """Token ids (N, L) int64."""
        return np.array([e.ids for e in self.tokenizer.encode_batch(prompts)], dtype=np.int64)
