"""The sparse half of a TopK training step, with a backward pass that touches only the chosen latents.

A TopK SAE computes its pre-activations densely (to find each token's k largest), but everything
after that involves only B·k (token, latent) pairs: the kept values, the decoder's weighted sum of
k rows, and every gradient. `sparse_code` is that half as one autograd function.

Backward, for the B·k pairs:
    g            = ⟨W_dec[latent], ∂L/∂x̂[token]⟩ (+ ∂L/∂vals), masked by the ReLU
    ∂L/∂W_dec    = Σ over each latent's pairs of vals · ∂L/∂x̂[token]
    ∂L/∂W_enc    = Σ over each latent's pairs of g · x_c[token]       (transposed)
    ∂L/∂b_enc    = Σ over each latent's pairs of g
    ∂L/∂b_dec    = −W_enc ∂L/∂b_enc                                  (x_c = x − b_dec)
All of them read the pairs in latent-major order: one stable integer sort of the B·k latent ids
(a radix sort) gives that order, and the pairs become a CSR matrix [d_sae, B] whose rows are
latents and whose columns are tokens, already sorted. The two weight gradients are then two
sparse × dense products and g one sampled dense × dense product (SDDMM), all library kernels.

It replaces a sparse CSR transpose (which sorts) for W_enc and embedding_bag's backward (which
sorts again) for W_dec. `python benchmarks/sae_speed.py` times the whole step; peers mode
(`benchmarks/peers.py`) compares it with sparsify and SAELens.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F


class _SparseCode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, b_dec, W_enc, b_enc, W_dec, idx, pre, xc, relu):
        vals = pre.gather(1, idx).to(W_dec.dtype)  # pre may be bf16 under autocast
        if relu:
            vals = vals.clamp_min(0)
        decoded = F.embedding_bag(idx, W_dec, per_sample_weights=vals, mode="sum")
        ctx.save_for_backward(xc, W_enc, W_dec, idx, vals)
        ctx.relu = relu
        return vals, decoded

    @staticmethod
    def backward(ctx, g_vals, g_dec):
        xc, W_enc, W_dec, idx, vals = ctx.saved_tensors
        need_x, need_b_dec, need_W_enc, need_b_enc, need_W_dec = ctx.needs_input_grad[:5]
        B, k = idx.shape
        d_sae = W_dec.shape[0]
        flat = idx.flatten()
        order = flat.argsort(stable=True)  # latent-major; tokens stay ascending within a latent
        token = torch.div(order, k, rounding_mode="floor")
        counts = torch.bincount(flat, minlength=d_sae)
        crow = F.pad(counts.cumsum(0), (1, 0))

        def pairs(values: torch.Tensor) -> torch.Tensor:
            """The pairs as a CSR matrix [d_sae, B] holding `values` (given in latent-major order)."""
            with warnings.catch_warnings():  # "sparse CSR support is in beta"
                warnings.simplefilter("ignore", UserWarning)
                return torch.sparse_csr_tensor(crow, token, values, (d_sae, B), check_invariants=False)

        g_dec = g_dec.contiguous()
        if g_dec.dtype != W_dec.dtype:
            g_dec = g_dec.to(W_dec.dtype)
        vals_lat = vals.flatten()[order]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            g_lat = torch.sparse.sampled_addmm(pairs(torch.zeros_like(vals_lat)), W_dec, g_dec.T, beta=0.0).values()
        if g_vals is not None:
            g_lat = g_lat + g_vals.flatten()[order]
        if ctx.relu:
            g_lat = g_lat * (vals_lat > 0)
        grad_x = grad_b_dec = grad_W_enc = grad_b_enc = grad_W_dec = None
        if need_W_dec:
            grad_W_dec = torch.sparse.mm(pairs(vals_lat), g_dec)
        if need_W_enc:
            grad_W_enc = torch.sparse.mm(pairs(g_lat), xc).T.contiguous()  # W_enc's own layout
        if need_b_enc or need_b_dec:
            grad_b_enc = torch.zeros(d_sae, dtype=g_lat.dtype, device=g_lat.device).index_add_(0, flat[order], g_lat)
            if need_b_dec:
                grad_b_dec = -(W_enc @ grad_b_enc)
        if need_x:
            g = torch.empty_like(g_lat).index_copy_(0, order, g_lat).view(B, k)
            grad_x = F.embedding_bag(idx, W_enc.T.contiguous(), per_sample_weights=g, mode="sum")
        return grad_x, grad_b_dec, grad_W_enc, grad_b_enc if need_b_enc else None, grad_W_dec, None, None, None, None


def sparse_code(x: torch.Tensor, b_dec: Optional[torch.Tensor], W_enc: torch.Tensor, b_enc: torch.Tensor,
                W_dec: torch.Tensor, idx: torch.Tensor, pre: torch.Tensor, relu: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(vals [B, k], decoded [B, d_out]) for the latents `idx` [B, k] of pre-activations `pre` [B, d_sae]
    = (x − b_dec) W_enc + b_enc, computed without autograd: vals = pre at idx (through a ReLU when
    `relu`), decoded = Σⱼ vals[:, j] W_dec[idx[:, j]] (no b_dec added). Gradients flow to x, b_dec
    (None for a transcoder, whose input is not centred), W_enc, b_enc and W_dec."""
    with torch.no_grad():
        xc = x if b_dec is None else x - b_dec
    return _SparseCode.apply(x, b_dec, W_enc, b_enc, W_dec, idx, pre, xc, relu)


def topk_indices(pre: torch.Tensor, k: int, block: int = 8) -> torch.Tensor:
    """The indices [B, k] of each row's k largest values (in no particular order), exactly as a set
    (up to ties), found in 0.65-0.87× the time of `torch.topk` at 4,096-16,384 columns and k 32
    (measured alone on the 2-core development machine).

    The columns are split into blocks of `block` (column c belongs to block c mod n_blocks). The k
    largest values lie in the k blocks with the largest maxima: a value outside those blocks is at
    most its block's maximum, which is at most k other blocks' maxima, so it has k larger values.
    So: the block maxima (a vectorised reduction), their top k, and then the top k of those blocks'
    k·block values, instead of a per-row selection over every column."""
    B, n = pre.shape
    while block > 2 and n // block < 4 * k:  # smaller blocks for a larger k (AuxK's k_aux)
        block //= 2
    n_blocks = n // block
    if n % block or n < 2048 or n_blocks < 4 * k:
        return pre.topk(k, dim=-1, sorted=False).indices
    blocks = pre.view(B, block, n_blocks).amax(1).topk(k, dim=-1, sorted=False).indices  # [B, k]
    columns = (blocks[:, :, None] + n_blocks * torch.arange(block, device=pre.device)).view(B, k * block)
    return columns.gather(1, pre.gather(1, columns).topk(k, dim=-1, sorted=False).indices)
