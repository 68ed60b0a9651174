"""What the explorer's Layers and Characters panels show, computed from a model of models.py.

    logit_lens(model, idx)        -> (layers, vocab) probabilities: the guess after each block
    character_map(model, tokenizer) -> the vocabulary's embeddings projected to two dimensions (PCA)

Nothing here changes a model or trains it; both are read straight from its weights.
"""

import torch
import torch.nn.functional as F

from models import TinyGPT, soft_cap


@torch.no_grad()
def logit_lens(model, idx):
    """The next-character probabilities for the last position of idx (1, T), read out after each
    block: the final LayerNorm and the LM head applied to the residual stream at that depth (the
    "logit lens"), so that one sees where the guess forms. Returns (n_layer, V); its last row is the
    model's own prediction. A Bigram has one row: its table."""
    if not isinstance(model, TinyGPT):
        return F.softmax(model(idx)[0][0, -1].float(), dim=-1)[None]  # (1, V)
    was_training = model.training
    model.eval()
    idx = idx[:, -model.block_size:]
    x = model.token_embedding(idx)  # (1, T, C)
    cos, sin = model.rotary(0, idx.size(1))
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    rows = []
    for block in model.blocks:
        x = block(x, cos, sin)  # (1, T, C)
        logits = model.lm_head(model.ln_f(x[:, -1]))  # (1, V): this depth's guess for the next character
        if model.logit_cap:
            logits = soft_cap(logits, model.logit_cap)
        rows.append(F.softmax(logits.float(), dim=-1)[0])
    model.train(was_training)
    return torch.stack(rows)  # (n_layer, V)


def character_map(model, tokenizer):
    """Each character of the vocabulary as a point in two dimensions: its embedding (TinyGPT's
    token_embedding, or the Bigram's row of its table) projected on the two directions along which
    the embeddings vary most (PCA: the top two right singular vectors of the centred matrix).
    Returns the points [{char, x, y, kind}] and the share of the variance each direction explains."""
    table = (model.token_embedding if isinstance(model, TinyGPT) else model.token_embedding_table).weight
    centred = table.detach().float().cpu() - table.detach().float().cpu().mean(dim=0)  # (V, C)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    xy = centred @ vh[:2].T  # (V, 2)
    explained = (s[:2] ** 2 / (s ** 2).sum()).tolist()
    points = [{"char": ch, "x": float(x), "y": float(y), "kind": character_kind(ch)}
              for ch, (x, y) in zip(tokenizer.chars, xy.tolist())]
    return points, explained


def character_kind(ch):
    """A character's kind, for the map's colours."""
    if ch.isspace():
        return "space"
    if ch in "aeiouAEIOU":
        return "vowel"
    if ch.islower():
        return "lowercase"
    if ch.isupper():
        return "uppercase"
    if ch.isdigit():
        return "digit"
    return "punctuation"
