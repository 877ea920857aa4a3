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


class TokenPacker:
    """Packs documents into full windows of ``ctx_len`` tokens: no padding, no truncation.

    Documents are tokenised without special tokens, each followed by the tokenizer's EOS
    token as a separator (when it has one), concatenated, and cut into windows; the tokens
    past the last full window wait for the next documents. Windows attend across document
    boundaries, as in pretraining on packed data. A window's ``position_ids`` run 0..T-1.
    """

    def __init__(self, tokenizer, ctx_len: int):
        self.tokenizer, self.ctx_len = tokenizer, ctx_len
        self.separator = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
        self.carry: list[int] = []

    def add(self, texts: list[str]) -> None:
        for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
            self.carry.extend(ids)
            self.carry.extend(self.separator)

    @property
    def n_full_windows(self) -> int:
        return len(self.carry) // self.ctx_len

    def windows(self, n: int, final: bool = False) -> dict[str, torch.Tensor] | None:
        """Up to ``n`` full windows as a model batch (``None`` when there are none). With
        ``final``, the leftover tokens make one last, shorter window."""
        n = min(n, self.n_full_windows)
        if n == 0:
            if not (final and self.carry):
                return None
            ids, self.carry = torch.tensor([self.carry]), []
        else:
            take = n * self.ctx_len
            ids = torch.tensor(self.carry[:take]).view(n, self.ctx_len)
            del self.carry[:take]
        mask = torch.ones_like(ids)
        return {"input_ids": ids, "attention_mask": mask,
                "position_ids": torch.arange(ids.shape[1]).expand_as(ids)}
