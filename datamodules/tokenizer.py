"""Load the LLM's tokenizer and give it what a VLM needs: an image placeholder and a pad token."""

from __future__ import annotations

from transformers import AutoTokenizer, PreTrainedTokenizerBase


def load_tokenizer(path: str, image_token: str = "<image>") -> PreTrainedTokenizerBase:
    """The tokenizer at `path` with the image placeholder and a pad token added when missing.

    Args:
        path: tokenizer or model directory (or hub id where a network exists).
        image_token: placeholder string; added as one special token when missing.

    Added tokens grow the vocabulary; the model resizes the LLM's embeddings to `len(tokenizer)`
    (INF-LLaVA's Llama-3 gets a pad token the same way: vocab 128256 -> 128257).
    """
    tok = AutoTokenizer.from_pretrained(path)
    if image_token not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": [image_token]}, replace_extra_special_tokens=False)
    if tok.pad_token is None:
        tok.add_special_tokens({"pad_token": "<pad>"})
    return tok
