"""Attention-pattern scores, defined once. Shape letters as in workbench.model.transformer.

Every score is the mean attention weight from query position s to key position s - offset,
over the query positions s that have such a key, the batch, and (per head) nothing else:

    previous-token score   offset 1            on any sequence
    induction score        offset L - 1        on a random sequence of length L repeated once,
                                               queries in the second copy
    duplicate-token score  offset L            same sequence: attention to the earlier occurrence
    first-token score      key position 0      queries from `start` on

The prefix-matching score (Olsson et al. 2022) is defined by the tokens, not by an offset: the
attention from each token to every earlier position whose *preceding* token equals it, summed
over those positions. On a random sequence repeated several times that is the attention to the
token after each earlier copy of the current token.
"""

from __future__ import annotations

import torch


def offset_score(pattern_BHST: torch.Tensor, offset: int, start: int) -> torch.Tensor:
    """[H] mean over batch and queries s >= start of pattern[:, :, s, s - offset]."""
    S = pattern_BHST.shape[-2]
    if not (0 <= offset <= start < S):
        raise ValueError(f"offset_score needs 0 <= offset ({offset}) <= start ({start}) < seq len ({S}).")
    diag_BHs = pattern_BHST.diagonal(offset=-offset, dim1=-2, dim2=-1)  # pattern[s, s-offset], s = offset..S-1
    return diag_BHs[..., start - offset:].mean(dim=(0, -1))


def first_token_score(pattern_BHST: torch.Tensor, start: int = 1) -> torch.Tensor:
    """[H] mean attention to key position 0 from queries s >= start."""
    return pattern_BHST[:, :, start:, 0].mean(dim=(0, -1))


def induction_score(pattern_BHST: torch.Tensor, seq_len: int, prefix: int = 0) -> torch.Tensor:
    """[H] induction score on [prefix tokens] + a random length-`seq_len` sequence repeated once."""
    return offset_score(pattern_BHST, offset=seq_len - 1, start=prefix + seq_len)


def duplicate_token_score(pattern_BHST: torch.Tensor, seq_len: int, prefix: int = 0) -> torch.Tensor:
    """[H] attention from the second copy to the same token in the first copy."""
    return offset_score(pattern_BHST, offset=seq_len, start=prefix + seq_len)


def previous_token_score(pattern_BHST: torch.Tensor) -> torch.Tensor:
    """[H] attention to the immediately preceding token."""
    return offset_score(pattern_BHST, offset=1, start=1)


def prefix_matching_score(pattern_BHST: torch.Tensor, tokens_BS: torch.Tensor, start: int) -> torch.Tensor:
    """[H] mean over batch and queries s >= start of the summed attention to keys k <= s whose
    previous token tokens[k - 1] equals tokens[s]."""
    B, H, S, T = pattern_BHST.shape
    if tokens_BS.shape != (B, S) or S != T or not 0 <= start < S:
        raise ValueError(f"prefix_matching_score needs a [B, H, S, S] pattern, [B, S] tokens and 0 <= start < S; "
                         f"got pattern {tuple(pattern_BHST.shape)}, tokens {tuple(tokens_BS.shape)}, start {start}.")
    prev_BT = torch.cat([torch.full_like(tokens_BS[:, :1], -1), tokens_BS[:, :-1]], dim=1)  # no token before 0
    match_BST = (tokens_BS[:, :, None] == prev_BT[:, None, :]).tril()  # keys k <= s only
    scores_BHS = (pattern_BHST * match_BST[:, None].to(pattern_BHST.dtype)).sum(-1)
    return scores_BHS[..., start:].mean(dim=(0, -1))
