"""smoll's two character-level language models, built bottom-up.

    sample_next      -> turns the last position's logits into the next character id
    KVCache          -> keys and values kept between decoding steps, so each step is cheap
    LanguageModel    -> what both models share: generate() and stream()
    Bigram           -> the baseline: next character from the previous one alone
    rotary helpers   -> position information for TinyGPT (RoPE)
    causal_attention -> self-attention written out: softmax(QK^T / sqrt(d) + mask) V
    CausalSelfAttention, MLP, Block, TinyGPT -> a GPT-style decoder-only transformer
    Ensemble, distillation_loss -> several trained models as one, and a student learning from them
    PackedLinear     -> sampling speed on a CPU: bfloat16 weights laid out once for oneDNN

Both models share one interface: forward(idx, targets=None) -> (logits, loss), where idx holds
character ids of shape (B, T), logits has shape (B, T, vocab) and loss is the mean cross-entropy
against targets (or None). train.py and play.py never need to know which model they hold.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------
# Sampling, shared by both models


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
    logits = logits.float() if temperature == 1 else logits.float() / temperature  # (B, V)
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

    Without a cache, every new character means a forward pass over the whole window. With one,
    the model only runs the new character: its query attends to the keys and values kept here.
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


class LanguageModel(nn.Module):
    """Base class: subclasses set self.block_size and self.receptive_field (how many of the last
    characters the next prediction can depend on) and define forward(idx, targets=None, cache=None)."""

    block_size: int
    receptive_field: int

    @torch.no_grad()  # (not inference_mode: its tensors cannot enter a compiled step)
    def stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, use_cache=True,
               decoder=None, generator=None):
        """Yield max_new_tokens new ids, each of shape (B, 1), as soon as each is sampled.

        use_cache=True runs only the new character through the model at each step (see KVCache).
        use_cache=False is the plain reference decoder: for every new character it reruns the full
        forward pass over all of the text that can still reach the prediction. The tests check
        that the two give the same text, within the window and past it. Dropout is off while sampling.
        decoder (a Decoder of this model, or None) runs the characters after the prompt in fewer calls.
        generator (a torch.Generator) draws the samples instead of PyTorch's global random state.

        The lecture code's decoder reruns only the last block_size characters. That is the same
        thing while the text fits in the window. Past it, cropping is not a cache-free version of
        the model any more: with more than one layer, the cropped window's first characters lose
        the context that their deeper-layer states were computed from, at every step. No cache can
        reproduce that without rerunning the window, so smoll's model defines what happens past
        the window instead: sliding-window attention (see TinyGPT.forward).
        """
        was_training = self.training
        self.eval()
        try:
            cache = KVCache(self.block_size) if use_cache else None
            unseen = idx  # (B, T): what the cache has not processed yet
            for _ in range(max_new_tokens):
                if cache is None:
                    logits, _ = self(idx[:, -self.receptive_field:])  # (B, <=receptive_field, V)
                elif decoder is not None and unseen.size(1) == 1:  # after the prompt: the lean path
                    logits = decoder.step(unseen, cache)[:, None]  # (B, 1, V)
                else:  # a long prompt goes in window-sized pieces; after it, one id at a time
                    for piece in unseen.split(self.block_size, dim=1):
                        logits, _ = self(piece, cache=cache)  # (B, <=block_size, V)
                next_id = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)  # (B, 1)
                if cache is None:
                    idx = torch.cat([idx, next_id], dim=1)  # (B, T+1)
                unseen = next_id
                yield next_id
        finally:
            self.train(was_training)

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, use_cache=True,
                 decoder=None):
        """Return idx (B, T) extended by max_new_tokens sampled ids: (B, T + max_new_tokens)."""
        new_ids = list(self.stream(idx, max_new_tokens, temperature, top_k, top_p, use_cache, decoder))
        return torch.cat([idx, *new_ids], dim=1)


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
        self.token_embedding_table = nn.Embedding(vocab_size, vocab_size)
        # Small weights give near-uniform predictions, so the loss starts at about ln(vocab).
        nn.init.normal_(self.token_embedding_table.weight, std=0.02)

    def forward(self, idx, targets=None, cache=None):
        # The prediction depends on the current character alone, so there is nothing to cache.
        logits = self.token_embedding_table(idx)  # (B, T, V)
        loss = None if targets is None else cross_entropy(logits, targets)
        return logits, loss


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
# The transformer


def causal_mask(T, S, window, device=None):
    """(T, S) booleans: may query i attend to key j? The T queries are the last T of S positions.

    A position sees itself and the positions before it, but at most `window` positions in all.
    Within the window (S <= window) this is the usual lower-triangular causal mask.
    """
    q_pos = torch.arange(S - T, S, device=device)[:, None]  # (T, 1)
    k_pos = torch.arange(S, device=device)[None, :]  # (1, S)
    return (k_pos <= q_pos) & (q_pos - k_pos < window)  # (T, S)


def causal_attention(q, k, v, window, return_weights=False):
    """Scaled dot-product attention with a causal mask, written out step by step.

    q: (B, nh, T, hs); k, v: (B, nh, S, hs), where the T queries are the last T of S positions.
    Returns (B, nh, T, hs), and also the attention weights (B, nh, T, S) if return_weights.
    A position may only look at itself and earlier positions, so the model cannot peek at the
    characters it is asked to predict.
    F.scaled_dot_product_attention computes the same thing in one fused, memory-saving kernel;
    CausalSelfAttention uses it, except in bfloat16 on a CPU, where this is faster. tests/ check
    that the two agree.
    """
    T, S, hs = q.size(-2), k.size(-2), q.size(-1)
    att = (q @ k.transpose(-2, -1)) / math.sqrt(hs)  # (B, nh, T, S): how much t attends to s
    mask = causal_mask(T, S, window, q.device)  # (T, S)
    att = att.masked_fill(~mask, float("-inf"))  # masked positions get zero weight after softmax
    att = F.softmax(att.float(), dim=-1).to(v.dtype)  # each row sums to 1 (summed in float32)
    y = att @ v  # (B, nh, T, hs): weighted values
    return (y, att) if return_weights else y


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.window = config.block_size
        self.qk_norm = config.qk_norm
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)  # q, k, v in one matmul
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.use_sdpa = None  # None: SDPA but in bfloat16 on a CPU; True or False: SDPA or causal_attention
        self.keep_weights = False  # True stores each forward's attention weights in self.weights
        self.weights = None

    def forward(self, x, cos, sin, cache=None, layer=0):
        B, T, C = x.shape
        # q, k and v for every head in one matmul. Each head attends on its own slice of
        # hs = C / nh channels.
        qkv = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head)  # (B, T, 3, nh, hs)
        qkv = qkv.permute(2, 0, 3, 1, 4)  # (3, B, nh, T, hs)
        qk = apply_rotary(qkv[:2], cos, sin)  # (2, B, nh, T, hs): positions enter q and k here
        if self.qk_norm:  # unit-RMS queries and keys: the attention logits cannot blow up
            qk = F.rms_norm(qk, (qk.size(-1),))  # q and k in one call: on a CPU each call costs more than its work
        q, k, v = qk[0], qk[1], qkv[2]  # each (B, nh, T, hs)
        dtype = q.dtype
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nh, S, hs): the cached past, then these T
            q = q.to(k.dtype)  # attention over the cache runs in its dtype, float32
        S = k.size(2)
        # No dropout on the attention weights: on a CPU it would push scaled_dot_product_attention
        # off its fused kernel, and the block's output dropout below regularises as well.
        if self.keep_weights:  # someone wants to look at the attention: take the written-out path
            y, self.weights = causal_attention(q, k, v, self.window, return_weights=True)
        elif self.use_sdpa is False or (self.use_sdpa is None and q.device.type == "cpu"
                                        and q.dtype == torch.bfloat16 and T > 1):
            # On a CPU, the fused kernel runs bfloat16 slower than these plain matmuls do: a training
            # step of --preset cpu takes 1.1x to 1.5x as long through it (README: Speed).
            y = causal_attention(q, k, v, self.window)  # (B, nh, T, hs)
        elif T == S <= self.window:  # training, or a prompt that fits: the plain causal mask
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif T == 1 and S <= self.window:  # one new character: it may see everything in the cache
            y = F.scaled_dot_product_attention(q, k, v)  # (B, nh, 1, hs)
        else:  # past the window: a sliding causal mask
            mask = causal_mask(T, S, self.window, q.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.to(dtype).transpose(1, 2).reshape(B, T, C)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.proj(y))  # (B, T, C)


def relu2(x):
    """ReLU squared: as cheap as ReLU, and smooth at 0 like GELU."""
    return F.relu(x).square()


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


class Block(nn.Module):
    """One transformer block, pre-LayerNorm: x + attention(norm(x)), then x + mlp(norm(x)).

    Normalising before each sub-layer (rather than after, as in the 2017 paper) leaves a clean
    residual path from input to output, which keeps deep stacks stable to train.
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


class TinyGPT(LanguageModel):
    def __init__(self, config, vocab_size):
        super().__init__()
        self.block_size = config.block_size
        # Each layer looks back at most block_size - 1 positions (sliding-window attention past the
        # window), so through n_layer layers the next prediction depends on this many characters.
        self.receptive_field = config.n_layer * (config.block_size - 1) + 1
        self.token_embedding = nn.Embedding(vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, vocab_size, bias=False)
        # The rotary tables are derived from the config, so they are not saved in checkpoints.
        self.head_size = config.n_embd // config.n_head
        cos, sin = rotary_tables(self.head_size, torch.arange(config.block_size))
        self.register_buffer("rope_cos", cos, persistent=False)  # (block_size, hs)
        self.register_buffer("rope_sin", sin, persistent=False)  # (block_size, hs)
        self._far_rope = (0, cos[:0], sin[:0])  # tables past block_size: see far_rotary_tables

        # GPT-2 initialisation: small normal weights. Each block adds two projections onto the
        # residual stream, so those are scaled down by sqrt(2 * n_layer) to keep its variance flat.
        # With zero_init they start at zero instead: each block begins as the identity.
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.0 if config.zero_init else 0.02 / math.sqrt(2 * config.n_layer))
        self.logit_cap = config.logit_cap

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None, cache=None):
        """idx (B, T) -> logits (B, T, V) and the loss, or None without targets.

        With a cache, idx holds only the characters the cache has not seen, and it is updated.
        A sequence longer than block_size gets sliding-window attention: each position attends
        to the block_size positions ending at itself, exactly what the cache does past the window.
        """
        B, T = idx.shape
        start = cache.pos if cache is not None else 0  # the position of idx[:, 0]
        if start + T <= self.block_size:
            cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]  # (T, hs)
        else:
            cos, sin = self.far_rotary_tables(start, T, idx.device)  # (T, hs)
        x = self.drop(self.token_embedding(idx))  # (B, T, C)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # for a bfloat16 model, once rather than per layer
        for layer, block in enumerate(self.blocks):
            x = block(x, cos, sin, cache, layer)  # (B, T, C)
        if cache is not None:
            cache.pos += T
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        if self.logit_cap:  # soft-capping: no logit can grow past +-logit_cap
            logits = self.logit_cap * torch.tanh(logits / self.logit_cap)
        loss = None if targets is None else cross_entropy(logits, targets)
        return logits, loss

    def far_rotary_tables(self, start, T, device):
        """Rotary tables for positions past block_size, which only sampling with a KV cache or a
        long sequence reaches. They are made 4096 positions at a time and reused."""
        first, cos, sin = self._far_rope
        if not (first <= start and start + T <= first + len(cos)) or cos.device != device:
            first = start
            # Kept for later calls, so made as ordinary tensors even while sampling (which runs
            # under inference_mode): a forward pass that trains may use them next.
            with torch.inference_mode(False):
                cos, sin = rotary_tables(self.head_size, torch.arange(start, start + max(T, 4096)))
                cos, sin = cos.to(device), sin.to(device)
            self._far_rope = (first, cos, sin)
        return cos[start - first:start - first + T], sin[start - first:start - first + T]

    @torch.no_grad()
    def attention_maps(self, idx):
        """Attention weights for idx (1, T): a tensor (n_layer, n_head, T, T), rows summing to 1."""
        attns = [block.attn for block in self.blocks]
        for attn in attns:
            attn.keep_weights = True
        try:
            self(idx)
            return torch.stack([attn.weights[0] for attn in attns])  # (L, nh, T, T)
        finally:
            for attn in attns:
                attn.keep_weights, attn.weights = False, None


def build_model(config, vocab_size):
    """The model named by config.model, freshly initialised."""
    return {"tinygpt": TinyGPT, "bigram": Bigram}[config.model](config, vocab_size)


# ----------------------------------------------------------------------------------------------
# Several models as one, and one model that learns from several (README: Ensembles and distillation)


class Ensemble(nn.Module):
    """K trained models that predict together: their next-character distribution is the mean of the
    members' distributions. Averaging probabilities, not logits, keeps what any one member is sure
    of: a character that one member gives 0.6 and the others 0 still gets 0.6 / K.

    forward returns log-probabilities where a model returns logits: log_softmax leaves them as they
    are, so cross-entropy over them is the ensemble's loss, and eval_loss scores it like one model.
    """

    def __init__(self, members):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.block_size = min(m.block_size for m in members)

    def log_probs(self, idx, temperature=1.0):
        """idx (B, T) -> log of the members' mean probabilities (B, T, V), each member's logits
        divided by temperature first."""
        logps = torch.stack([F.log_softmax(m(idx)[0].float() / temperature, dim=-1)
                             for m in self.members])  # (K, B, T, V)
        return torch.logsumexp(logps, dim=0) - math.log(len(self.members))  # log(mean p), without underflow

    def forward(self, idx, targets=None):
        log_probs = self.log_probs(idx)
        loss = None if targets is None else cross_entropy(log_probs, targets)
        return log_probs, loss


def distillation_loss(logits, targets, teacher_log_probs, weight, temperature=1.0):
    """The loss of a student that learns from teachers as well as from the text (Hinton et al. 2015,
    "Distilling the knowledge in a neural network"):

        (1 - weight) * cross-entropy(student, true next characters)
        + weight * temperature² * KL(teachers' distribution || student's distribution)

    with both distributions softened by the temperature. The KL term tells the student how likely
    every other character was, not only which one came. Its gradients shrink as 1/temperature²,
    hence the factor. logits (B, T, V) are the student's; teacher_log_probs (B, T, V) come from
    Ensemble.log_probs at the same temperature. With weight 0 this is exactly cross_entropy.
    """
    ce = cross_entropy(logits, targets)
    student = F.log_softmax(logits.flatten(0, 1).float() / temperature, dim=-1)  # (B*T, V)
    kl = F.kl_div(student, teacher_log_probs.flatten(0, 1).float(), log_target=True,
                  reduction="batchmean")  # the mean over positions of sum_v p_teacher (log p_teacher - log p_student)
    return (1 - weight) * ce + weight * temperature ** 2 * kl


# ----------------------------------------------------------------------------------------------
# Sampling speed: one character at a time in few calls, and weights that read fast


class PackedLinear(nn.Module):
    """A bias-free nn.Linear for sampling in bfloat16 on a CPU: the same numbers, sooner.

    Sampling one character at a time multiplies every weight matrix by a single vector, so its
    speed is set by how fast the weights can be read. oneDNN, the CPU library under PyTorch's
    bfloat16 matmuls, reads them fastest in its own blocked layout. nn.Linear hands it the plain
    layout at every call; here the weight is reordered once. These are the two oneDNN ops that
    torch.compile puts in place of a frozen model's linear layers on a CPU. For inference only.
    """

    def __init__(self, linear):
        super().__init__()
        self.weight = linear.weight  # kept as it is, so that state_dict() does not change
        # the 1: laid out for one row at a time, the way sampling multiplies (more rows work too)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x):
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")  # x @ W^T


def _check_close(y, reference, tolerance=0.02):
    """Raise AssertionError unless y is within tolerance of reference, relative to its largest value.
    (Not torch.testing.assert_close: importing it takes half a second, longer than sampling 500 characters.)"""
    error = (y.float() - reference.float()).abs().max()
    if not error <= tolerance * reference.float().abs().max().clamp_min(1.0):
        raise AssertionError(f"off by {error.item():.3g}")


def pack_for_cpu_sampling(model):
    """Swap every bfloat16 nn.Linear of a model on the CPU for a PackedLinear, in place. Call it
    after moving the model to its device and dtype. Returns how many layers were swapped: 0 where
    it does not apply (float32 weights, a GPU, or a PyTorch built without oneDNN)."""
    if not (torch.backends.mkldnn.enabled and torch.backends.mkldnn.is_available()):
        return 0
    linears = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if type(child) is nn.Linear and child.bias is None
               and child.weight.dtype == torch.bfloat16 and child.weight.device.type == "cpu"]
    try:
        packed = [PackedLinear(child) for _, _, child in linears]
        if packed:  # these are private ops: check once that they exist here and compute x @ W^T
            x = torch.randn(2, linears[0][2].in_features, dtype=torch.bfloat16)
            _check_close(packed[0](x), F.linear(x, linears[0][2].weight))
    except (RuntimeError, AttributeError, NotImplementedError, AssertionError):
        return 0  # a PyTorch without these ops, or a oneDNN that cannot pack bfloat16 here: keep nn.Linear
    for (parent, name, _), new in zip(linears, packed):
        setattr(parent, name, new)
    return len(packed)


class Int8Linear(nn.Module):
    """A bias-free nn.Linear with int8 weights, for sampling: a quarter of float32's bytes to read.

    Weight-only quantisation: each output row keeps its own scale, max|row| / 127, and the
    activations stay in floating point. PyTorch's CPU kernel for this (the one gpt-fast uses)
    takes bfloat16 activations and returns bfloat16, so this layer belongs in a bfloat16 model.
    Rounding each weight to one of 255 levels of its row costs little: bench.py --window_quality
    measures it (README: Precision while sampling). For inference only.
    """

    def __init__(self, linear):
        super().__init__()
        w = linear.weight.detach().float()  # (out, in)
        scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127  # (out,): one step of the row's grid
        self.register_buffer("qweight", torch.round(w / scale[:, None]).to(torch.int8))  # (out, in)
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x):
        shape = x.shape
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shape[-1]), self.qweight, self.scale)
        return y.view(*shape[:-1], self.out_features)  # (..., out) = x @ (qweight * scale)^T


def quantize_for_cpu_sampling(model):
    """Swap every bias-free nn.Linear of a bfloat16 model on the CPU for an Int8Linear, in place.
    Returns how many layers were swapped: 0 where the kernel is missing or wrong here."""
    linears = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if type(child) is nn.Linear and child.bias is None
               and child.weight.dtype == torch.bfloat16 and child.weight.device.type == "cpu"]
    try:
        quantized = [Int8Linear(child) for _, _, child in linears]
        if quantized:  # a private kernel: check once that it exists here and computes x @ W^T
            x = torch.randn(3, linears[0][2].in_features, dtype=torch.bfloat16)
            _check_close(quantized[0](x), F.linear(x, linears[0][2].weight), tolerance=0.05)
    except (RuntimeError, AttributeError, NotImplementedError, AssertionError):
        return 0
    for (parent, name, _), new in zip(linears, quantized):
        setattr(parent, name, new)
    return len(quantized)


def _matmul(module):
    """The cheapest call for module's x (B, in) -> x @ W^T (B, out), plus an optional residual (B, out)."""
    if type(module) is nn.Linear:  # one BLAS call that also adds the residual
        w_t = module.weight.t()  # (in, out), a view
        return lambda x, residual=None: torch.mm(x, w_t) if residual is None else torch.addmm(residual, x, w_t)
    forward = module.forward  # skips nn.Module.__call__'s hooks, which cost more than this work here
    return lambda x, residual=None: forward(x) if residual is None else residual + forward(x)


class Decoder:
    """TinyGPT's forward pass for one new character per sequence, in as few calls as it takes.

    Sampling runs one position at a time, and then a CPU spends more time starting each of
    PyTorch's operations than doing its arithmetic: for one position, TinyGPT.forward costs about
    160 ATen operations a layer (nn.Module calls, views and copies between heads and channels,
    QK-norm's five). This computes the same thing in about 110, on the ring buffers of a KVCache:
    - the residual stream stays (B, C): one position needs no reshapes between heads and channels;
    - q and k of all heads get RoPE together, in three calls (apply_rotary);
    - each residual add happens inside its projection's matmul (torch.addmm), for nn.Linear;
    - QK-norm is one vector norm: x / rms(x) = x * sqrt(hs) / |x|.
    It works with whatever linear layers the model holds: nn.Linear in its dtype, PackedLinear or
    Int8Linear. The prompt goes through TinyGPT.forward, which fills the same cache. Tests check
    that the two give the same logits and, in float32, the same greedy text far past the window.
    """

    def __init__(self, model):
        self.model = model
        self.window, self.cap = model.block_size, model.logit_cap
        self.n_head, self.hs = model.blocks[0].attn.n_head, model.head_size
        self.C, self.rope = model.lm_head.in_features, None
        self.layers = [dict(ln_1=(block.ln_1.weight, block.ln_1.bias), ln_2=(block.ln_2.weight, block.ln_2.bias),
                            qkv=_matmul(block.attn.qkv), proj=_matmul(block.attn.proj),
                            fc=_matmul(block.mlp.fc), fc_proj=_matmul(block.mlp.proj),
                            act=block.mlp.act, qk_norm=block.attn.qk_norm) for block in model.blocks]
        self.head = _matmul(model.lm_head)

    def rotary(self, pos, device, dtype):
        """cos and sin (hs,) for position pos."""
        first, cos, sin = self.rope or (0, None, None)
        if cos is None or not first <= pos < first + len(cos):  # 4096 positions' rows at a time
            if pos < self.window:
                first, cos, sin = 0, self.model.rope_cos, self.model.rope_sin
            else:
                first = pos
                cos, sin = self.model.far_rotary_tables(pos, 4096, device)
            self.rope = (first, cos.to(dtype), sin.to(dtype))  # (N, hs) each
        return cos[pos - first], sin[pos - first]

    def step(self, idx, cache):
        """idx (B, 1): the next character of each sequence -> logits (B, V). Updates the cache."""
        pos = cache.pos
        cos, sin = self.rotary(pos, idx.device, self.model.token_embedding.weight.dtype)
        ring = [cache.buffers(i, idx.size(0), self.n_head, self.hs, idx.device) for i in range(len(self.layers))]
        slot = torch.tensor([pos % self.window], device=idx.device)
        logits = self.forward(idx, cos, sin, ring, slot, min(pos + 1, self.window), None)
        cache.pos += 1
        return logits

    def forward(self, idx, cos, sin, ring, slot, n, mask):
        """One step on explicit inputs: ring holds each layer's (keys, values) buffers, slot (1,)
        is where this position goes, and the query sees the first n slots, or all of them through
        mask (B, 1, 1, W) where n is None. The compiled step (CompiledDecoder) takes the second
        form: its shapes never change, so it is one graph for every position."""
        model, C, nh, hs = self.model, self.C, self.n_head, self.hs
        B = idx.size(0)
        x = model.token_embedding.weight[idx[:, 0]]  # (B, C)
        for layer, (k_buf, v_buf) in zip(self.layers, ring):  # buffers (B, nh, W, hs), float32
            qkv = layer["qkv"](F.layer_norm(x, (C,), *layer["ln_1"]))  # (B, 3C)
            qk = apply_rotary(qkv[:, :2 * C].view(B, 2, nh, hs), cos, sin)  # (B, 2, nh, hs): q and k
            if layer["qk_norm"]:  # x / rms(x) = x / (|x| / sqrt(hs))
                qk = qk.float() / (torch.linalg.vector_norm(qk.float(), dim=-1, keepdim=True) * hs ** -0.5)
            k_buf.index_copy_(2, slot, qk[:, 1, :, None].float())  # overwrites the position that left the window
            v_buf.index_copy_(2, slot, qkv[:, 2 * C:3 * C].view(B, nh, 1, hs).float())
            q = qk[:, 0, :, None, :].float()  # (B, nh, 1, hs)
            if n is not None and n < self.window:
                k_buf, v_buf = k_buf[:, :, :n], v_buf[:, :, :n]  # the filled slots
            y = F.scaled_dot_product_attention(q, k_buf, v_buf, attn_mask=mask)  # (B, nh, 1, hs)
            x = layer["proj"](y.view(B, C).to(x.dtype), x)  # (B, C): x + attention
            x = layer["fc_proj"](layer["act"](layer["fc"](F.layer_norm(x, (C,), *layer["ln_2"]))), x)
        logits = self.head(F.layer_norm(x, (C,), model.ln_f.weight, model.ln_f.bias))  # (B, V)
        if self.cap:
            logits = self.cap * torch.tanh(logits / self.cap)
        return logits


class CompiledDecoder:
    """A Decoder step compiled by torch.compile, on a KV cache of fixed shape.

    Every step runs the same graph: the slot to write, the rotary angles and the mask of filled
    slots are tensors, and the query always attends over all `window` slots of the ring (the
    empty ones masked while it fills; from then on, no mask). So torch.compile builds two graphs
    and reuses them for every position, with the pointwise work between the matmuls fused into
    a few kernels. On CUDA, mode="reduce-overhead" also records each graph as a CUDA graph and
    replays it with one launch, which is what makes one-character steps fast on a GPU; the ring
    buffers are marked as static addresses so that the recording can write into them. Compiling
    takes seconds to minutes, so play.py only picks this where it has measured that it pays.
    """

    def __init__(self, decoder, mode=None):
        self.decoder = decoder
        self.forward = torch.compile(decoder.forward, mode=mode, dynamic=False)
        self.cache = None  # the KVCache whose buffers are marked static

    def step(self, idx, cache):
        d, pos = self.decoder, cache.pos
        W = d.window
        ring = [cache.buffers(i, idx.size(0), d.n_head, d.hs, idx.device) for i in range(len(d.layers))]
        if cache is not self.cache:  # a new cache (a new prompt): its buffers get fixed addresses
            for k_buf, v_buf in ring:
                torch._dynamo.mark_static_address(k_buf)
                torch._dynamo.mark_static_address(v_buf)
            self.cache = cache
        # While the ring fills, slots past pos hold nothing yet: mask them (1, 1, 1, W).
        mask = (torch.arange(W, device=idx.device) <= pos)[None, None, None] if pos < W - 1 else None
        cos, sin = d.rotary(pos, idx.device, d.model.token_embedding.weight.dtype)
        slot = torch.tensor([pos % W], device=idx.device)
        logits = self.forward(idx, cos, sin, ring, slot, None, mask)
        cache.pos += 1
        return logits.clone()  # a CUDA graph's output is overwritten by its next replay
