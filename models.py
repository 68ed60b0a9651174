"""smoll's two character-level language models, and how text is sampled from them.

    LanguageModel    -> what both models share: generate and stream, which sample text from them
    build_model, cross_entropy -> the model a config names; the loss both models compute
    Bigram           -> the baseline: the next character from the previous one alone
    TinyGPT, soft_cap -> a GPT-style decoder-only transformer, then its parts, whole to detail:
        Block            one layer: attention, then an MLP, each added to the residual stream
        CausalSelfAttention   softmax(QK^T / sqrt(d) + mask) V, head by head
        causal_attention, causal_mask, qk_norm   attention written out
        MLP, relu2       widen, a nonlinearity, project back
        rotary_tables, apply_rotary   where positions come in (RoPE)
    sample_next, filter_logits, KVCache -> generation: the next character from the logits, and the
        cache that lets each new character cost one position's work

Both models share one interface: forward(idx, targets=None) -> (logits, loss), where idx holds
character ids of shape (B, T), logits has shape (B, T, vocab) and loss is the mean cross-entropy
against targets (or None). train.py's loop and play.py's sampling never need to know which model
they hold. stream() without a decoder is the reference for generation: the fast decoder of
smoll/sampling reuses these pieces, and the tests check it against that reference.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class LanguageModel(nn.Module):
    """Base class: subclasses set self.block_size and self.receptive_field (how many of the last
    characters the next prediction can depend on) and define forward(idx, targets=None, cache=None)."""

    block_size: int
    receptive_field: int

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, use_cache=True,
                 decoder=None):
        """Return idx (B, T) extended by max_new_tokens sampled ids: (B, T + max_new_tokens)."""
        new_ids = list(self.stream(idx, max_new_tokens, temperature, top_k, top_p, use_cache, decoder))
        return torch.cat([idx, *new_ids], dim=1)

    @torch.no_grad()  # (not inference_mode: its tensors cannot enter a compiled step)
    def stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, use_cache=True,
               decoder=None, generator=None):
        """Yield max_new_tokens new ids, each of shape (B, 1), as soon as each is sampled.

        use_cache=True runs only the new character through the model at each step (see KVCache).
        use_cache=False is the plain reference decoder: for every new character it reruns the full
        forward pass over all of the text that can still reach the prediction. The tests check
        that the two give the same text, within the context window and past it. Dropout is off
        while sampling. decoder (smoll/sampling's fast step for this model, or None) computes the
        same as forward for one new character per sequence, in fewer calls. generator (a
        torch.Generator) draws the samples instead of PyTorch's global random state.

        The generate of the "Let's build GPT" lecture code (and of nanoGPT) reruns only the last
        block_size characters. That is the same thing while the text fits in the context window.
        Past it, cropping is not a cache-free version of the model any more: with more than one
        layer, the cropped text's first characters lose the context that their deeper-layer states
        were computed from, at every step. No cache can reproduce that without rerunning the
        window, so smoll's model defines what happens past the context window instead:
        sliding-window attention (see TinyGPT.forward).
        """
        was_training = self.training
        self.eval()
        try:
            cache = KVCache(self.block_size) if use_cache else None
            unseen = idx  # (B, T): what the cache has not processed yet
            for _ in range(max_new_tokens):
                if cache is None:
                    logits, _ = self(idx[:, -self.receptive_field:])  # (B, <=receptive_field, V)
                elif decoder is not None and unseen.size(1) == 1:  # one new character per sequence
                    logits = decoder.step(unseen, cache)[:, None]  # (B, 1, V)
                else:  # a prompt goes in pieces of block_size; after it, one character at a time
                    for piece in unseen.split(self.block_size, dim=1):
                        logits, _ = self(piece, cache=cache)  # (B, <=block_size, V)
                next_id = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)  # (B, 1)
                if cache is None:
                    idx = torch.cat([idx, next_id], dim=1)  # (B, T+1)
                unseen = next_id
                yield next_id
        finally:
            self.train(was_training)


def build_model(config, vocab_size):
    """The model named by config.model, freshly initialised."""
    return {"tinygpt": TinyGPT, "bigram": Bigram}[config.model](config, vocab_size)


def cross_entropy(logits, targets):
    """Mean next-character loss in nats; logits (B, T, V), targets (B, T)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


# ----------------------------------------------------------------------------------------------
# The baseline


class Bigram(LanguageModel):
    """Row i of one vocab x vocab table holds the logits of the character that follows character i."""

    def __init__(self, config, vocab_size):
        super().__init__()
        self.block_size = config.block_size
        self.receptive_field = 1  # the current character alone
        # (named as in the "Let's build GPT" lecture: the "embedding" of a character is its row of logits)
        self.token_embedding_table = nn.Embedding(vocab_size, vocab_size)
        # Small weights give near-uniform predictions, so the loss starts at about ln(vocab).
        nn.init.normal_(self.token_embedding_table.weight, std=0.02)

    def forward(self, idx, targets=None, cache=None):
        # The prediction depends on the current character alone, so there is nothing to cache.
        logits = self.token_embedding_table(idx)  # (B, T, V)
        loss = None if targets is None else cross_entropy(logits, targets)
        return logits, loss


# ----------------------------------------------------------------------------------------------
# The transformer


class TinyGPT(LanguageModel):
    """The transformer: token embeddings, n_layer Blocks, a final LayerNorm and the LM head that
    turns each position's vector into logits over the vocabulary. Positions enter through RoPE
    inside attention, so there is no position table."""

    def __init__(self, config, vocab_size):
        super().__init__()
        self.block_size = config.block_size
        # Each layer looks back at most block_size - 1 positions (sliding-window attention past the
        # context window), so through n_layer layers the next prediction depends on this many characters.
        self.receptive_field = config.n_layer * (config.block_size - 1) + 1
        self.token_embedding = nn.Embedding(vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, vocab_size, bias=False)
        self.logit_cap = config.logit_cap
        # The rotary tables are derived from the config, so they are not saved in checkpoints.
        self.head_size = config.n_embd // config.n_head
        cos, sin = rotary_tables(self.head_size, torch.arange(config.block_size))
        self.register_buffer("rope_cos", cos, persistent=False)  # (block_size, hs)
        self.register_buffer("rope_sin", sin, persistent=False)  # (block_size, hs)
        self._far_rope = (0, cos[:0], sin[:0])  # the positions past block_size: see rotary()

        # GPT-2 initialisation: small normal weights. Each block adds two projections onto the
        # residual stream, so those are scaled down by sqrt(2 * n_layer) to keep its variance flat.
        # With zero_init they start at zero instead: each block begins as the identity.
        for p in self.parameters():
            if p.dim() == 2:  # the weight matrices; the norms' gains start at 1 and their biases at 0
                nn.init.normal_(p, std=0.02)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, std=0.0 if config.zero_init else 0.02 / math.sqrt(2 * config.n_layer))

    def forward(self, idx, targets=None, cache=None):
        """idx (B, T) -> logits (B, T, V) and the loss, or None without targets.

        With a cache, idx holds only the characters the cache has not seen, and it is updated.
        A sequence longer than block_size gets sliding-window attention: each position attends
        to the block_size positions ending at itself, exactly what the cache does past the window.
        """
        B, T = idx.shape
        start = cache.pos if cache is not None else 0  # the position of idx[:, 0]
        x = self.drop(self.token_embedding(idx))  # (B, T, C)
        cos, sin = self.rotary(start, T)  # (T, hs) each
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # for a bfloat16 model, once rather than per layer
        for layer, block in enumerate(self.blocks):
            x = block(x, cos, sin, cache, layer)  # (B, T, C)
        if cache is not None:
            cache.pos += T
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        if self.logit_cap:  # logit soft-capping: every logit squashed smoothly into (-cap, cap)
            logits = soft_cap(logits, self.logit_cap)
        loss = None if targets is None else cross_entropy(logits, targets)
        return logits, loss

    def rotary(self, start, T):
        """RoPE's cos and sin rows (T, hs) for positions start .. start + T - 1. Training sees the
        first block_size positions; only sampling with a KV cache, or a longer text, goes past them,
        and those rows are made 4096 positions at a time and kept for the steps that follow."""
        if start + T <= self.block_size:
            return self.rope_cos[start:start + T], self.rope_sin[start:start + T]
        first, cos, sin = self._far_rope
        if not (first <= start and start + T <= first + len(cos)) or cos.device != self.rope_cos.device \
                or cos.dtype != self.rope_cos.dtype:
            # Kept for later calls, so made as ordinary tensors even while sampling (which may run
            # under inference_mode): a forward pass that trains may use them next.
            with torch.inference_mode(False):
                cos, sin = rotary_tables(self.head_size, torch.arange(start, start + max(T, 4096)))
                cos, sin = cos.to(self.rope_cos), sin.to(self.rope_sin)  # the model's device and dtype
            first = start
            self._far_rope = (first, cos, sin)
        return cos[start - first:start - first + T], sin[start - first:start - first + T]

    @torch.no_grad()
    def attention_maps(self, idx):
        """Attention weights for idx (1, T): a tensor (n_layer, n_head, T, T), rows summing to 1."""
        attns = [block.attn for block in self.blocks]
        for attn in attns:
            attn.keep_attention = True
        try:
            self(idx)
            return torch.stack([attn.attention[0] for attn in attns])  # (L, nh, T, T)
        finally:
            for attn in attns:
                attn.keep_attention, attn.attention = False, None


def soft_cap(logits, cap):
    """cap * tanh(logits / cap): no logit grows past +-cap, and small ones are left nearly as they are."""
    return cap * torch.tanh(logits / cap)


class Block(nn.Module):
    """One transformer block, pre-LayerNorm: x + attention(norm(x)), then x + mlp(norm(x)).

    x is the residual stream: each block reads it and adds its result to it. Normalising before
    each sub-layer (rather than after, as in the 2017 paper) leaves a clean residual path from
    input to output, which keeps deep stacks stable to train.
    """

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), cos, sin, cache, layer)  # (B, T, C): tokens exchange information
        x = x + self.mlp(self.ln_2(x))  # (B, T, C): each token thinks on its own
        return x


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: each of n_head heads attends over its own slice of the
    channels, with RoPE on its queries and keys, and the heads' outputs are projected back."""

    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.window = config.block_size  # how many positions, itself included, a position sees
        self.qk_norm = config.qk_norm
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)  # q, k, v in one matmul
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.use_sdpa = True  # the fused kernel, or False: causal_attention (smoll/speed.py times both)
        self.keep_attention = False  # True stores each forward's attention weights in self.attention
        self.attention = None

    def forward(self, x, cos, sin, cache=None, layer=0):
        B, T, C = x.shape
        # q, k and v for every head in one matmul. Each head attends on its own slice of
        # hs = C / nh channels.
        qkv = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head)  # (B, T, 3, nh, hs)
        qkv = qkv.permute(2, 0, 3, 1, 4)  # (3, B, nh, T, hs)
        qk = apply_rotary(qkv[:2], cos, sin)  # (2, B, nh, T, hs): positions enter q and k here
        if self.qk_norm:
            qk = qk_norm(qk)  # q and k in one call: on a CPU each call costs more than its work
        q, k, v = qk[0], qk[1], qkv[2]  # each (B, nh, T, hs)
        dtype = q.dtype
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nh, S, hs): the cached past, then these T
            q = q.to(k.dtype)  # attention over the cache runs in its dtype, float32
        S = k.size(2)
        # No dropout on the attention weights: on a CPU it would push scaled_dot_product_attention
        # off its fused kernel, and the block's output dropout below regularises as well.
        if self.keep_attention:  # someone wants to look at the attention: the written-out path
            y, self.attention = causal_attention(q, k, v, self.window, return_weights=True)
        elif not self.use_sdpa:
            y = causal_attention(q, k, v, self.window)  # (B, nh, T, hs)
        elif S <= self.window and T in (1, S):  # training, a prompt that fits, or one new character
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)  # (B, nh, T, hs)
        else:  # past the context window: a sliding causal mask
            mask = causal_mask(T, S, self.window, q.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.to(dtype).transpose(1, 2).reshape(B, T, C)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.proj(y))  # (B, T, C)


def causal_attention(q, k, v, window, return_weights=False):
    """Scaled dot-product attention with a causal mask, written out step by step.

    q: (B, nh, T, hs); k, v: (B, nh, S, hs), where the T queries are the last T of S positions.
    Returns (B, nh, T, hs), and also the attention weights (B, nh, T, S) if return_weights.
    A position may only look at itself and earlier positions, so the model cannot peek at the
    characters it is asked to predict.
    F.scaled_dot_product_attention computes the same thing in one fused, memory-saving kernel.
    Which of the two is faster depends on the device, the precision and the sizes, so train.py
    times both before it starts (smoll/speed.py). tests/ check that the two agree.
    """
    T, S, hs = q.size(-2), k.size(-2), q.size(-1)
    att = (q @ k.transpose(-2, -1)) / math.sqrt(hs)  # (B, nh, T, S): how much t attends to s
    mask = causal_mask(T, S, window, q.device)  # (T, S)
    att = att.masked_fill(~mask, float("-inf"))  # masked positions get zero weight after softmax
    att = F.softmax(att.float(), dim=-1).to(v.dtype)  # each row sums to 1 (summed in float32)
    y = att @ v  # (B, nh, T, hs): weighted values
    return (y, att) if return_weights else y


def causal_mask(T, S, window, device=None):
    """(T, S) booleans: may query i attend to key j? The T queries are the last T of S positions.

    A position sees itself and the positions before it, but at most `window` positions in all.
    Within the window (S <= window) this is the usual lower-triangular causal mask.
    """
    q_pos = torch.arange(S - T, S, device=device)[:, None]  # (T, 1)
    k_pos = torch.arange(S, device=device)[None, :]  # (1, S)
    return (k_pos <= q_pos) & (q_pos - k_pos < window)  # (T, S)


def qk_norm(x):
    """x / rms(x) over each head's channels (QK-norm): queries and keys of unit RMS, so that the
    attention logits cannot blow up. Written as x / (|x| / sqrt(hs)): on a CPU that is cheaper
    than F.rms_norm for the few positions of sampling. The result keeps x's dtype."""
    return (x / (torch.linalg.vector_norm(x, dim=-1, keepdim=True) * x.size(-1) ** -0.5)).to(x.dtype)


class MLP(nn.Module):
    """Position-wise feed-forward network: widen 4x, a nonlinearity (GELU or ReLU²), project back."""

    def __init__(self, config):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.act = {"gelu": F.gelu, "relu2": relu2}[config.activation]
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.proj(self.act(self.fc(x))))  # (B, T, C)


def relu2(x):
    """ReLU squared: as cheap as ReLU, and smooth at 0 like GELU."""
    return F.relu(x).square()


# ----------------------------------------------------------------------------------------------
# Rotary position embeddings (RoPE, Su et al. 2021, "RoFormer").
# Each pair of channels in a query or key is rotated by an angle that grows with the position.
# The dot product of a query at position i with a key at position j then depends only on i - j,
# so attention sees relative positions, and no position table has to be learned.


def rotary_tables(head_size, positions, base=10000.0):
    """cos and sin tables for the given positions (a 1-D tensor), each (len(positions), head_size).

    Channel i is paired with channel i + head_size/2, and each pair turns by one angle, so both
    halves of a row hold the same angles. The sin table's first half is negated, which lets
    apply_rotary do the whole rotation in one multiply-add. The angles are computed in float64,
    so that they stay exact for positions in the millions.
    """
    inv_freq = 1.0 / base ** (torch.arange(0, head_size, 2, dtype=torch.float64) / head_size)  # (hs/2,)
    angles = torch.outer(positions.to(torch.float64), inv_freq)  # (T, hs/2)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([cos, cos], dim=-1).float(), torch.cat([-sin, sin], dim=-1).float()  # (T, hs)


def apply_rotary(x, cos, sin):
    """Rotate x (..., T, hs) by the angles for its T positions; cos, sin are (T, hs) from rotary_tables.

    With x = [x1, x2] (halves of hs/2 channels), the rotation is [x1 cos - x2 sin, x2 cos + x1 sin]:
    x * cos plus the halves swapped, [x2, x1], times [-sin, sin]. Three calls, whatever the shape.
    """
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # no-ops, except under autocast
    return torch.addcmul(x * cos, x.roll(x.size(-1) // 2, dims=-1), sin)  # (..., T, hs)


# ----------------------------------------------------------------------------------------------
# Generation: the next character from the logits, and the KV cache


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Pick the next id for each row of logits (B, vocab). Returns ids of shape (B, 1).

    temperature 0 is greedy (argmax). Otherwise the id is drawn from softmax(filter_logits(...)),
    from generator if one is given (else PyTorch's global random state).
    """
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)  # (B, 1)
    probs = F.softmax(filter_logits(logits, temperature, top_k, top_p), dim=-1)  # (B, V)
    if probs.device.type == "mps":  # MPS's multinomial can pick an id of probability 0: draw on the CPU
        return torch.multinomial(probs.cpu(), num_samples=1, generator=generator).to(probs.device)  # (B, 1)
    return torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)


def filter_logits(logits, temperature=1.0, top_k=None, top_p=None):
    """The logits (B, vocab) that sampling draws from, as float32: divided by the temperature
    (> 0), then -inf for every id outside the top_k likeliest and outside the smallest set whose
    probabilities add up to at least top_p ("nucleus sampling"). top_k first, then top_p on what
    is left. The explorer draws softmax of these beside softmax of the raw logits."""
    logits = logits.float()  # (B, V)
    if temperature != 1:  # the largest logit goes to 0 first, so a tiny temperature cannot overflow
        logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth_best = torch.topk(logits, top_k, dim=-1).values[:, [-1]]  # (B, 1)
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
        sorted_probs = F.softmax(sorted_logits, dim=-1)
        # Drop an id once the ids ranked above it already cover top_p. The best id always stays.
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # (B, V)
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)  # undo the sort
    return logits


class KVCache:
    """Each attention layer's keys and values for the last `window` positions, in a ring buffer.

    Without a cache, every new character means a forward pass over the whole context window. With
    one, the model only runs the new character: its query attends to the keys and values kept here.
    Each layer gets `window` slots, and position p is written to slot p % window, over the
    position one window older that no query can see any more. The buffers never grow or move.
    The keys are stored already rotated (RoPE) for their positions, so a query can take them in
    any slot order: attention scores depend only on the offset between two positions, and a single
    query's softmax does not care about the order of its keys.
    Past the window this is sliding-window attention: at every layer, each position attends to the
    `window` positions ending at itself. TinyGPT's forward pass over a longer sequence computes
    exactly that, and the tests check that the cache matches it.
    Keys and values are kept in float32 whatever the model's dtype: on a CPU, one query's attention
    runs several times faster in float32 than in bfloat16, and the cache is small.
    """

    def __init__(self, window):
        self.window = window
        self.pos = 0  # how many positions the model has processed
        self.k, self.v = {}, {}  # layer -> ring buffer (B, nh, window, hs)

    def buffers(self, layer, B, n_head, head_size, device):
        """The ring buffers of one layer, each (B, nh, window, hs), made on first use."""
        if layer not in self.k:
            self.k[layer] = torch.zeros(B, n_head, self.window, head_size, device=device)
            self.v[layer] = torch.zeros_like(self.k[layer])
        return self.k[layer], self.v[layer]

    def update(self, layer, k, v):
        """Add the new keys and values (B, nh, T, hs) of one layer, T <= window. Returns what the
        new queries may attend to (B, nh, S, hs): for one query, the filled slots in ring order;
        for several (a prompt), the kept past in order of position, then the new ones."""
        W, T = self.window, k.size(2)
        k_buf, v_buf = self.buffers(layer, k.size(0), k.size(1), k.size(3), k.device)
        if T == 1:  # one new character: it overwrites the slot that fell out of its window
            slot = self.pos % W
            k_buf[:, :, slot:slot + 1], v_buf[:, :, slot:slot + 1] = k, v
            n = min(self.pos + 1, W)  # before the ring is full, slots 0..pos hold positions 0..pos
            return k_buf[:, :, :n], v_buf[:, :, :n]  # (B, nh, n, hs)
        past = torch.arange(self.pos - min(self.pos, W - 1), self.pos) % W  # slots, oldest first
        k_all = torch.cat([k_buf[:, :, past], k.float()], dim=2)  # (B, nh, S, hs)
        v_all = torch.cat([v_buf[:, :, past], v.float()], dim=2)
        kept = min(T, W)  # of the new positions, the last window's worth stays in the ring
        slots = torch.arange(self.pos + T - kept, self.pos + T) % W
        k_buf[:, :, slots], v_buf[:, :, slots] = k[:, :, T - kept:].float(), v[:, :, T - kept:].float()
        return k_all, v_all
