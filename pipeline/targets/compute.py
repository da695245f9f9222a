"""Teacher targets for a batch of views: the math `hdpipe extract` stores and `hdpipe verify` redoes.

    mim_batch(teacher, x, layers, extras, ratio, tokens)  -> masks + relations (+ attention, block features)
    disc_batch(teacher, x, keep, tokens)                  -> final-layer features on the same tokens

Both run one forward pass of the frozen teacher (`Teacher.forward_targets`, which applies bf16
autocast on CUDA and refuses non-finite outputs) on a normalized batch x [B, 3, S, S], and gather
the stored token set: [CLS] + kept patches (tokens "kept"), or every token ("all").
"""
from __future__ import annotations

import torch

from pipeline.targets.masking import direct_keep, mask_layers, progressive_keep


def gather_tokens(x, tok):
    """Tokens `tok` of x. x: [B, N, ...] or relation-like [B, H, N, N]; tok: long [B, T].

    Token dims are gathered in order, so index 0 of the result is tok[:, 0] (the CLS token).
    """
    if x.dim() == 3:  # [B, N, D] -> [B, T, D]
        return torch.gather(x, 1, tok[:, :, None].expand(-1, -1, x.shape[-1]))
    b, h, n, _ = x.shape  # [B, H, N, N] -> [B, H, T, N] -> [B, H, T, T]
    t = tok.shape[1]
    rows = torch.gather(x, 2, tok[:, None, :, None].expand(b, h, t, n))
    return torch.gather(rows, 3, tok[:, None, None, :].expand(b, h, t, t))


def token_relations(q, k, tok):
    """Q·Kᵀ over tokens `tok` only: q, k [B, H, N, hd], tok long [B, T] -> [B, H, T, T] (row i is
    token tok[:, i]). The same dot products as gathering the full [N, N] relations, ~(N/T)² fewer."""
    b, h, _, d = q.shape
    idx = tok[:, None, :, None].expand(b, h, tok.shape[1], d)
    return torch.gather(q, 2, idx) @ torch.gather(k, 2, idx).transpose(-1, -2)


def token_index(keep, num_patches: int, tokens: str, batch: int, device):
    """long [B, T]: CLS (0) then kept patches shifted by one (tokens=kept), or every token (all)."""
    if tokens == "all":
        return torch.arange(num_patches + 1, device=device).expand(batch, -1)
    cls = torch.zeros(batch, 1, dtype=torch.long, device=device)
    return torch.cat([cls, keep.to(device=device, dtype=torch.long) + 1], dim=1)


def mim_batch(teacher, x, layers: tuple[int, ...], extras: tuple[str, ...], ratio: float, tokens: str,
              keep=None) -> dict:
    """MIM targets for a normalized batch x [B, 3, S, S] -> dict of tensors.

    keep_progressive, keep_direct: long [B, n_keep]; relations (+attention): [B, n_layers, H, T, T];
    block_features: [B, n_layers, T, D]. `keep` picks the token set gathered when tokens="kept":
    None, the computed progressive masks; "direct", the computed direct ones; a long [B, n_keep]
    tensor, those masks (`hdpipe verify` compares values on the stored set, online distillation
    gathers the student's random masks). No relation layers: masks only.
    """
    depth = teacher.depth
    mlayers = tuple(mask_layers(depth))
    want_blocks = layers if "block_features" in extras else ()
    # Q and K, not Q·Kᵀ: relations are needed on the stored tokens only, known after the masks.
    out = teacher.forward_targets(x, qk_layers=layers, hidden_layers=tuple(sorted(set(mlayers) | {depth})),
                                  block_layers=want_blocks, features=False)
    prog = progressive_keep({i: out["hidden"][i] for i in mlayers}, mlayers, ratio)  # [B, n_keep]
    direct = direct_keep(out["hidden"][depth], prog.shape[1])  # [B, n_keep]
    num_patches = out["hidden"][0].shape[1] - 1
    chosen = prog if keep is None else direct if isinstance(keep, str) and keep == "direct" else keep
    res = {"keep_progressive": prog, "keep_direct": direct}
    if not layers:
        return res
    tok = token_index(chosen, num_patches, tokens, x.shape[0], x.device)
    rel = torch.stack([token_relations(*out["qk"][i], tok) for i in layers], dim=1)  # [B, nL, H, T, T]
    res["relations"] = rel
    if "attention" in extras:
        # Softmax over the stored token set: what a student that sees only these tokens can match.
        res["attention"] = torch.softmax(rel * teacher.head_dim ** -0.5, dim=-1)
    if "block_features" in extras:
        res["block_features"] = torch.stack([gather_tokens(out["block"][i].float(), tok) for i in layers], dim=1)
    return res


def disc_batch(teacher, x, keep, tokens: str) -> dict:
    """features [B, T, D] after the final norm over [CLS]+keep (tokens=kept) or every token."""
    out = teacher.forward_targets(x, features=True)
    feats = out["features"].float()  # [B, N, D]
    tok = token_index(keep, feats.shape[1] - 1, tokens, x.shape[0], x.device)
    return {"features": gather_tokens(feats, tok)}
