"""The model side of modular addition (the task: `workbench.data.modular`): the answer logits a
`Transformer` gives for `a b =`, exactly and fast, its loss and accuracy over the task's split, and
whether a model was trained on the task.

    logits_NP = answer_logits(model, data.tokens_N3)     # the hooked forward; analyses use it
    evaluate(model, data)                                # {'train_loss', 'train_acc', 'test_loss', 'test_acc'}
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from workbench.data.modular import TASK, ModularData
from workbench.errors import InputError
from workbench.model.transformer import Transformer


def answer_logits(model: Transformer, tokens_N3: torch.Tensor) -> torch.Tensor:
    """Logits [N, p] of the answer, read at the `=` position (the logit of `=` itself is dropped)."""
    return model(tokens_N3)[:, -1, : model.cfg.d_vocab - 1]


def answer_logits_fast(model: Transformer, tokens_N3: torch.Tensor) -> torch.Tensor:
    """The same answer logits [N, p] as `answer_logits`, computing only what the answer position needs.

    Training uses it; analyses use the hooked forward. Exact for the task's model (one layer, no
    LayerNorm, `=` last), because of three facts. The loss reads position 2 alone, so the MLP and the
    unembedding run there only. Position 2 is always `=`, so its query is one vector for every example.
    The keys and values of `a` and `b` depend only on the token, so they are tables over the
    vocabulary ([V, H, K]), built once per step and gathered. That is 3-4x fewer FLOPs than the
    full forward; a test checks that it equals the hooked model."""
    cfg = model.cfg
    p = cfg.d_vocab - 1
    if (cfg.n_layers != 1 or cfg.normalization_type is not None or cfg.attn_only or cfg.act_fn != "relu"
            or tokens_N3.ndim != 2 or tokens_N3.shape[1] != 3 or not bool((tokens_N3[:, 2] == p).all())):
        raise InputError("answer_logits_fast is for the modular-addition model (one layer with an MLP, no LayerNorm) "
                         "on `a b =` inputs; use answer_logits for any other model.")
    attn, mlp = model.blocks[0].attn, model.blocks[0].mlp
    resid_eq_D = model.W_E[p] + model.W_pos[2]  # position 2 is `=` in every example
    q_HK = torch.einsum("d,hdk->hk", resid_eq_D, attn.W_Q) + attn.b_Q
    scale = 1 / math.sqrt(cfg.d_head)
    scores, values = [], []
    for pos in (0, 1):
        resid_VD = model.W_E + model.W_pos[pos]
        k_VHK = torch.einsum("vd,hdk->vhk", resid_VD, attn.W_K) + attn.b_K
        v_VHK = torch.einsum("vd,hdk->vhk", resid_VD, attn.W_V) + attn.b_V
        scores.append(((k_VHK * q_HK).sum(-1) * scale)[tokens_N3[:, pos]])  # [N, H]
        values.append(v_VHK[tokens_N3[:, pos]])  # [N, H, K]
    k_eq_HK = torch.einsum("d,hdk->hk", resid_eq_D, attn.W_K) + attn.b_K
    v_eq_HK = torch.einsum("d,hdk->hk", resid_eq_D, attn.W_V) + attn.b_V
    N = tokens_N3.shape[0]
    scores.append(((k_eq_HK * q_HK).sum(-1) * scale).expand(N, -1))
    pattern_NH3 = torch.stack(scores, -1).softmax(-1)
    z_NHK = pattern_NH3[..., 0, None] * values[0] + pattern_NH3[..., 1, None] * values[1] \
        + pattern_NH3[..., 2, None] * v_eq_HK
    resid_ND = torch.addmm(attn.b_O, z_NHK.reshape(N, -1), attn.W_O.reshape(-1, cfg.d_model)) + resid_eq_D
    post_NM = torch.relu(torch.addmm(mlp.b_in, resid_ND, mlp.W_in))
    resid_ND = resid_ND + torch.addmm(mlp.b_out, post_NM, mlp.W_out)
    return torch.addmm(model.b_U[:p], resid_ND, model.W_U[:, :p])


def loss_and_accuracy(logits_NP: torch.Tensor, labels_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy (in float64, so losses near 1e-7 stay exact) and accuracy of answer logits [N, p]."""
    loss = F.cross_entropy(logits_NP.double(), labels_N)
    return loss, (logits_NP.argmax(-1) == labels_N).double().mean()


@torch.no_grad()
def evaluate(model: Transformer, data: ModularData) -> dict[str, float]:
    """Train and test loss and accuracy over the whole split."""
    device = model.W_E.device
    logits = answer_logits(model, data.tokens_N3.to(device))
    labels = data.labels_N.to(device)
    out = {}
    for name, idx in (("train", data.train_idx), ("test", data.test_idx)):
        loss, acc = loss_and_accuracy(logits[idx.to(device)], labels[idx.to(device)])
        out[f"{name}_loss"], out[f"{name}_acc"] = float(loss), float(acc)
    return out


def is_modular_model(model: Any) -> bool:
    """Whether `model` is a workbench Transformer trained on modular addition (its config.json says so)."""
    return isinstance(model, Transformer) and model.meta.get("train", {}).get("task") == TASK
