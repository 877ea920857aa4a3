"""Text to model inputs: truncate-and-pad batches with an attention mask.

Batches are left-padded (nnsight's convention for language models). Real tokens are the
ones with ``attention_mask == 1``; padding is never told apart by comparing token ids,
since Pythia's pad, BOS and EOS are one id. Position ids count real tokens only, so an
absolute-position model (GPT-2) sees each text as if it ran alone.
"""

from __future__ import annotations

import torch


def tokenize_batch(tokenizer, texts: list[str], ctx_len: int) -> dict[str, torch.Tensor]:
    """Tokenise ``texts`` into a left-padded batch of at most ``ctx_len`` tokens per row.

    Returns ``input_ids``, ``attention_mask`` and ``position_ids``, each ``[B, T]``.
    """
    if tokenizer.pad_token is None:
        # GPT-2 style tokenizers ship without one; any id works since padding is masked.
        tokenizer.pad_token = tokenizer.eos_token
    enc = tokenizer(list(texts), return_tensors="pt", padding=True, truncation=True,
                    max_length=ctx_len, padding_side="left")
    mask = enc["attention_mask"]
    return {
        "input_ids": enc["input_ids"],
        "attention_mask": mask,
        "position_ids": (mask.cumsum(dim=-1) - 1).clamp_min(0),
    }


def real_token_mask(attention_mask: torch.Tensor, remove_bos: bool = False) -> torch.Tensor:
    """Boolean ``[B, T]``: the tokens whose activations count.

    With ``remove_bos`` the first real token of every row is dropped too (its activations
    have outsized norms whether or not it is a BOS token).
    """
    mask = attention_mask.bool()
    if remove_bos:
        mask = mask & (attention_mask.cumsum(dim=-1) > 1)
    return mask
