"""The text side: a tokenizer over a fixed vocabulary, a small trainable encoder, and the interface
a pretrained encoder (T5, CLIP, ...) implements to replace it.

PixArt-alpha reads the token states (cross-attention); FLUX reads the token states (its txt stream)
and the pooled vector (added to its modulation vector). The originals' T5/CLIP cannot be downloaded
here, and the prompts are single digits ("7" / "seven"), so a few transformer layers trained with the
diffusion model do the job.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor, nn

from .checks import check_heads, check_int
from .layers import Mlp, SelfAttention, plain_norm

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
NUMERALS = tuple(str(d) for d in range(10))
# The project's one spelling of the digits as words: the vocabulary here, the training prompts and the
# benchmarks' prompts all use it.
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# A few filler words so prompts like "a handwritten seven" do not collapse to <unk>.
FILLER = ("a", "an", "the", "digit", "number", "handwritten", "of", "image")
DEFAULT_VOCAB = (PAD, EOS, UNK, *NUMERALS, *DIGIT_WORDS, *FILLER)


@dataclass
class TextEncoding:
    """The conditioning both models take.

    tokens (B, T, D_txt) token states; mask (B, T) bool, True for real tokens (padding is False,
    and every row has at least one True); pooled (B, D_pool) one vector per prompt.
    """
    tokens: Tensor
    mask: Tensor
    pooled: Tensor


@runtime_checkable
class TextEncoder(Protocol):
    """What a text encoder gives the models; any nn.Module with these members plugs in.

    >>> from models.text import TinyTextEncoder, TextEncoder
    >>> isinstance(TinyTextEncoder(dim=32, depth=1, num_heads=2), TextEncoder)
    True
    """
    token_dim: int
    pooled_dim: int

    def __call__(self, prompts: Sequence[str]) -> TextEncoding: ...


class Tokenizer:
    """Lower-cased, whitespace-split words -> ids, then an end token, padded to max_length.

    Unknown words map to <unk>, and so do words spelling a special token ("<pad>", "<eos>": the mask
    and the pooled end token are read from the ids); the empty prompt (classifier-free guidance's null prompt) is just
    <eos>, as in T5, so it still has one real token to attend to. Longer prompts are cut to
    max_length - 1 words before the end token.

    >>> tok = Tokenizer(max_length=4)
    >>> ids, mask = tok(["7", "seven", "", "xyz"])
    >>> ids.tolist()[2], mask.tolist()[2]
    ([1, 0, 0, 0], [True, False, False, False])
    """

    def __init__(self, vocab: Sequence[str] = DEFAULT_VOCAB, max_length: int = 8) -> None:
        if list(vocab[:3]) != [PAD, EOS, UNK]:
            raise ValueError(f"vocab must start with {PAD!r}, {EOS!r}, {UNK!r}, got {list(vocab[:3])}")
        if len(set(vocab)) != len(vocab):
            raise ValueError("vocab entries must be unique")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be at least 2 (one word and the end token), got {max_length}")
        self.vocab = tuple(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.words = {w: i for w, i in self.index.items() if w not in (PAD, EOS)}
        self.max_length = max_length

    def encode(self, prompt: str) -> list[int]:
        words = prompt.lower().split()[: self.max_length - 1]
        return [self.words.get(w, self.index[UNK]) for w in words] + [self.index[EOS]]

    def __call__(self, prompts: Sequence[str], device=None) -> tuple[Tensor, Tensor]:
        """(ids (B, max_length) long, mask (B, max_length) bool)."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts must be a list of str, got {prompts!r}")
        ids = torch.zeros(len(prompts), self.max_length, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            tokens = self.encode(prompt)
            ids[row, : len(tokens)] = torch.tensor(tokens)
        mask = ids != self.index[PAD]
        return ids.to(device), mask.to(device)


class TextLayer(nn.Module):
    """Pre-norm transformer encoder layer; its norms follow the model's norm switch."""

    def __init__(self, dim: int, num_heads: int, norm: str, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = plain_norm(dim, norm)
        self.attn = SelfAttention(dim, num_heads)
        self.norm2 = plain_norm(dim, norm)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


class TinyTextEncoder(nn.Module):
    """A small trainable text encoder: embeddings, `depth` transformer layers, a final norm.

    The pooled vector is the end token's final state (CLIP pools at its end token too), so
    pooled_dim = token_dim = dim.

    Embeddings start at std 0.02 under LayerNorm, whose first norm rescales them to unit size. DyT does
    not rescale, so under DyT they start at unit size themselves (token and position std 1/sqrt(2)):
    from 0.02, the encoder's output tokens start with an RMS of 0.06 (LayerNorm's: 1.0; from unit
    size: 0.42), too faint a condition for the diffusion model to pick up quickly (README "How the
    small recipe was tuned").

    >>> enc = TinyTextEncoder(dim=32, depth=1, num_heads=2, max_length=4)
    >>> out = enc(["7", "seven", ""])
    >>> out.tokens.shape, out.mask.shape, out.pooled.shape
    (torch.Size([3, 4, 32]), torch.Size([3, 4]), torch.Size([3, 32]))
    """

    def __init__(self, dim: int = 256, depth: int = 2, num_heads: int = 4, max_length: int = 8,
                 norm: str = "dyt", vocab: Sequence[str] = DEFAULT_VOCAB) -> None:
        super().__init__()
        check_heads(dim, num_heads, ("dim", "num_heads"))
        check_int("depth", depth, minimum=0)
        self.tokenizer = Tokenizer(vocab, max_length)
        self.token_dim = self.pooled_dim = dim
        self.token_embedding = nn.Embedding(len(self.tokenizer.vocab), dim)
        self.position_embedding = nn.Parameter(torch.zeros(max_length, dim))
        self.layers = nn.ModuleList(TextLayer(dim, num_heads, norm) for _ in range(depth))
        self.final_norm = plain_norm(dim, norm)
        std = 0.02 if norm == "layernorm" else 2 ** -0.5
        nn.init.normal_(self.token_embedding.weight, std=std)
        nn.init.normal_(self.position_embedding, std=std)

    def forward(self, prompts: Sequence[str]) -> TextEncoding:
        ids, mask = self.tokenizer(prompts, device=self.position_embedding.device)
        return self.encode(ids, mask)

    def encode(self, ids: Tensor, mask: Tensor) -> TextEncoding:
        """The tensor part of forward (tokenized input): what torch.compile can trace."""
        x = self.token_embedding(ids) + self.position_embedding[: ids.shape[1]]
        for layer in self.layers:
            x = layer(x, mask)
        x = self.final_norm(x)
        # The end token is the last real one: tokens are left-aligned and padding follows.
        last = mask.long().sum(1) - 1
        pooled = x[torch.arange(x.shape[0], device=x.device), last]
        return TextEncoding(tokens=x, mask=mask, pooled=pooled)
