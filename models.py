"""smoll's two character-level language models, built bottom-up.

    sample_next      -> turns the last position's logits into the next character id
    LanguageModel    -> what both models share: generate() and stream()
    Bigram           -> the baseline: next character from the previous one alone
    rotary helpers   -> position information for TinyGPT (RoPE)
    causal_attention -> self-attention written out: softmax(QK^T / sqrt(d) + mask) V
    CausalSelfAttention, MLP, Block, TinyGPT -> a GPT-style decoder-only transformer

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


def sample_next(logits, temperature=1.0, top_k=None, top_p=None):
    """Pick the next id for each row of logits (B, vocab). Returns ids of shape (B, 1).

    temperature 0 is greedy (argmax). top_k keeps the k most likely ids; top_p keeps the smallest
    set of ids whose probabilities add up to at least p ("nucleus sampling"). They compose: top_k
    first, then top_p on what is left.
    """
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)  # (B, 1)
    logits = logits.float() / temperature  # (B, V)
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
    probs = F.softmax(logits, dim=-1)  # (B, V)
    return torch.multinomial(probs, num_samples=1)  # (B, 1)


class LanguageModel(nn.Module):
    """Base class: subclasses set self.block_size and define forward(idx, targets=None)."""

    block_size: int

    @torch.no_grad()
    def stream(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None):
        """Yield max_new_tokens new ids, each of shape (B, 1), as soon as each is sampled.

        This is the plain reference decoder: for every new character it runs the full forward
        pass over the last block_size characters. Dropout is off while sampling.
        """
        was_training = self.training
        self.eval()
        try:
            for _ in range(max_new_tokens):
                idx_cond = idx[:, -self.block_size:]  # (B, <=block_size): the model's window
                logits, _ = self(idx_cond)  # (B, T, V)
                next_id = sample_next(logits[:, -1, :], temperature, top_k, top_p)  # (B, 1)
                idx = torch.cat([idx, next_id], dim=1)  # (B, T+1)
                yield next_id
        finally:
            self.train(was_training)

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None):
        """Return idx (B, T) extended by max_new_tokens sampled ids: (B, T + max_new_tokens)."""
        new_ids = list(self.stream(idx, max_new_tokens, temperature, top_k, top_p))
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
        self.token_embedding_table = nn.Embedding(vocab_size, vocab_size)
        # Small weights give near-uniform predictions, so the loss starts at about ln(vocab).
        nn.init.normal_(self.token_embedding_table.weight, std=0.02)

    def forward(self, idx, targets=None):
        logits = self.token_embedding_table(idx)  # (B, T, V)
        loss = None if targets is None else cross_entropy(logits, targets)
        return logits, loss


# ----------------------------------------------------------------------------------------------
# Rotary position embeddings (RoPE, Su et al. 2021, "RoFormer").
# Each pair of channels in a query or key is rotated by an angle that grows with the position.
# The dot product of a query at position i with a key at position j then depends only on i - j,
# so attention sees relative positions, and no position table has to be learned.


def rotary_tables(head_size, length, base=10000.0):
    """cos and sin tables, each of shape (length, head_size // 2)."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_size, 2).float() / head_size)  # (hs/2,)
    angles = torch.outer(torch.arange(length).float(), inv_freq)  # (length, hs/2)
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    """Rotate x (B, nh, T, hs) by the angles for its T positions; cos, sin are (T, hs/2)."""
    x1, x2 = x.chunk(2, dim=-1)  # each (B, nh, T, hs/2): channel i is paired with i + hs/2
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)  # (B, nh, T, hs)


# ----------------------------------------------------------------------------------------------
# The transformer


def causal_attention(q, k, v, dropout_p=0.0):
    """Scaled dot-product attention with a causal mask, written out step by step.

    q, k, v: (B, nh, T, hs). Returns (B, nh, T, hs). Position t may only look at positions <= t,
    so the model cannot peek at the characters it is asked to predict.
    F.scaled_dot_product_attention(q, k, v, is_causal=True) computes the same thing in one fused,
    memory-saving kernel; CausalSelfAttention uses it, and tests/ check that the two agree.
    """
    T, hs = q.size(-2), q.size(-1)
    att = (q @ k.transpose(-2, -1)) / math.sqrt(hs)  # (B, nh, T, T): how much t attends to s
    mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()  # (T, T): s <= t
    att = att.masked_fill(~mask, float("-inf"))  # the future gets zero weight after softmax
    att = F.softmax(att, dim=-1)  # each row sums to 1
    att = F.dropout(att, p=dropout_p, training=dropout_p > 0)
    return att @ v  # (B, nh, T, hs): a weighted average of the values


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)  # q, k, v in one matmul
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.use_sdpa = True  # False runs the written-out causal_attention instead

    def forward(self, x, cos, sin):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)  # each (B, T, C)
        # Split the channels into heads: each head attends on its own slice of hs = C / nh channels.
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)  # positions enter here
        dropout_p = self.dropout if self.training else 0.0
        if self.use_sdpa:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:
            y = causal_attention(q, k, v, dropout_p=dropout_p)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.proj(y))  # (B, T, C)


class MLP(nn.Module):
    """Position-wise feed-forward network: widen 4x, GELU, project back."""

    def __init__(self, config):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.proj(F.gelu(self.fc(x))))  # (B, T, C)


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

    def forward(self, x, cos, sin):
        x = x + self.attn(self.ln_1(x), cos, sin)  # (B, T, C): tokens exchange information
        x = x + self.mlp(self.ln_2(x))  # (B, T, C): each token thinks on its own
        return x


class TinyGPT(LanguageModel):
    def __init__(self, config, vocab_size):
        super().__init__()
        self.block_size = config.block_size
        self.token_embedding = nn.Embedding(vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, vocab_size, bias=False)
        # The rotary tables are derived from the config, so they are not saved in checkpoints.
        cos, sin = rotary_tables(config.n_embd // config.n_head, config.block_size)
        self.register_buffer("rope_cos", cos, persistent=False)  # (block_size, hs/2)
        self.register_buffer("rope_sin", sin, persistent=False)  # (block_size, hs/2)

        # GPT-2 initialisation: small normal weights. Each block adds two projections onto the
        # residual stream, so those are scaled down by sqrt(2 * n_layer) to keep its variance flat.
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):
        B, T = idx.shape
        if T > self.block_size:
            raise ValueError(f"sequence of length {T} is longer than block_size {self.block_size}")
        x = self.drop(self.token_embedding(idx))  # (B, T, C)
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]  # (T, hs/2) each
        for block in self.blocks:
            x = block(x, cos, sin)  # (B, T, C)
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        loss = None if targets is None else cross_entropy(logits, targets)
        return logits, loss


def build_model(config, vocab_size):
    """The model named by config.model, freshly initialised."""
    return {"tinygpt": TinyGPT, "bigram": Bigram}[config.model](config, vocab_size)
