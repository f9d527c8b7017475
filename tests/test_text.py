"""Tests for models/text.py: the tokenizer, the tiny text encoder, and the interface a pretrained one plugs into."""
import pytest
import torch
from torch import nn

from models import TextEncoding, build_model
from models.text import DIGIT_WORDS, TextEncoder, Tokenizer
from tiny_models import TINY, tiny, timesteps


def test_tokenizer_numerals_words_unknown_and_empty():
    tok = Tokenizer(max_length=4)
    ids, mask = tok(["7", "Seven", "", "xyz", "one two three four five"])
    eos, unk = tok.index["<eos>"], tok.index["<unk>"]
    assert ids[0, :2].tolist() == [tok.index["7"], eos]
    assert ids[1, :2].tolist() == [tok.index["seven"], eos]
    assert ids[2].tolist() == [eos, 0, 0, 0] and mask[2].tolist() == [True, False, False, False]
    assert ids[3, :2].tolist() == [unk, eos]
    assert ids[4].tolist() == [tok.index["one"], tok.index["two"], tok.index["three"], eos] and mask[4].all()
    with pytest.raises(TypeError, match="list of str"):
        tok("7")


def test_text_encoder_pooled_is_the_end_token_state():
    model = tiny("flux")
    enc = model.encode_prompts(["", "a handwritten 8"])
    assert enc.tokens.shape == (2, 4, 16) and enc.mask.dtype == torch.bool and enc.pooled.shape == (2, 16)
    torch.testing.assert_close(enc.pooled[0], enc.tokens[0, 0])
    torch.testing.assert_close(enc.pooled[1], enc.tokens[1, 3])


@pytest.mark.parametrize("norm, std", [("layernorm", 0.02), ("dyt", 2 ** -0.5)])
def test_text_embeddings_start_at_the_scale_the_first_layer_sees(norm, std):
    """LayerNorm rescales std-0.02 embeddings to unit size; DyT does not, so under DyT they start there."""
    torch.manual_seed(0)
    enc = build_model("flux", "small", norm=norm).text_encoder
    for p in (enc.token_embedding.weight, enc.position_embedding):
        assert abs(p.std().item() / std - 1) < 0.15  # 31 x 64 and 4 x 64 draws: 15% is over 3 sigma


class FixedTextEncoder(nn.Module):
    """A stand-in for a pretrained encoder, with token and pooled widths unlike the built-in one."""
    token_dim, pooled_dim = 12, 7

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(10, 12))

    def forward(self, prompts):
        ids = torch.tensor([int(p) for p in prompts])
        tokens = self.table[ids][:, None].expand(-1, 3, -1)
        mask = torch.tensor([[True, True, False]]).expand(len(prompts), -1)
        return TextEncoding(tokens=tokens, mask=mask, pooled=tokens[:, 0, :7])


@pytest.mark.parametrize("name", ["pixart", "flux"])
def test_a_custom_text_encoder_plugs_in(name):
    encoder = FixedTextEncoder()
    assert isinstance(encoder, TextEncoder)
    config = {k: v for k, v in TINY[name].items() if not k.startswith("text_")}
    model = build_model(name, "small", image_size=16, text_encoder=encoder, **config)
    assert model.text_encoder is encoder
    out = model(torch.randn(2, 1, 16, 16), timesteps(name, 2), model.encode_prompts(["3", "4"]))
    assert out.shape == (2, 1, 16, 16)
    with pytest.raises(ValueError, match="text_\\* overrides"):
        build_model(name, "small", text_encoder=encoder, text_dim=8)




def test_every_digit_numeral_and_word_is_a_known_token():
    tok = Tokenizer(max_length=2)
    ids, _ = tok([str(d) for d in range(10)] + list(DIGIT_WORDS))
    assert len(set(ids[:, 0].tolist())) == 20 and tok.index["<unk>"] not in ids[:, 0].tolist()


def test_special_token_words_in_a_prompt_are_unknown_words():
    """A prompt word spelling a special token ("<pad>", "<eos>") is an unknown word. "<pad>" once became the
    pad id itself, so the mask (ids != pad) marked a real position as padding (attention skipped it) and
    the pooled vector, taken at position mask.sum() - 1, was a word's state instead of the end token's:
    "<pad> 7" pooled "7", and "<pad>" pooled the masked-out first position."""
    tok = Tokenizer(max_length=4)
    ids, mask = tok(["<pad> 7", "<pad>", "<eos> 7"])
    eos, unk = tok.index["<eos>"], tok.index["<unk>"]
    assert ids.tolist() == [[unk, tok.index["7"], eos, 0], [unk, eos, 0, 0], [unk, tok.index["7"], eos, 0]]
    assert mask.tolist() == [[True, True, True, False], [True, True, False, False], [True, True, True, False]]
    model = tiny("flux")
    enc = model.encode_prompts(["<pad> 7", "<pad>"])
    torch.testing.assert_close(enc.pooled[0], enc.tokens[0, 2])  # the end token's state
    torch.testing.assert_close(enc.pooled[1], enc.tokens[1, 1])
