"""Text side: tokenizer and text encoder against the official ``sam3`` package (float32, CPU)."""

from __future__ import annotations

import re
import sys
import unicodedata
import warnings

import pytest
import torch
import torch.nn as nn

from official_ref import bpe_path, build_official_image_model, cpu_mode, official, redraw_
from sam3fast.config import get_config
from sam3fast.model import tokenizer as tokmod
from sam3fast.model.text import TextEncoder
from sam3fast.model.tokenizer import SimpleTokenizer

LONG_PROMPT = " ".join(f"object{i}, the big red one" for i in range(12))

PROMPTS = [
    "dog",
    "a red car",
    "The Person On The LEFT",
    "dog!?",
    "dog!$",  # "!" not at the end of a word is BPE id 0, the pad id
    "wow!!!!!! cool...",
    "3 cats and 42 dogs, 2.5 kg",
    "   many   spaces\tand\nnew lines  ",
    "don't stop, we'll SEE it's O'Neill's",
    "café crème brûlée, naïve façade",
    "東京タワー 和 中文",
    "émoji 🐶🐱 👍🏽",
    "it’s a “quoted” word",
    "ﬁsh and ﬂies",
    "Ｆｕｌｌｗｉｄｔｈ ＡＢＣ１２３",
    "Tom &amp; Jerry",
    "&lt;b&gt;bold&lt;/b&gt; &amp;amp; double",
    "a <b>tag</b> &amp; entity",
    "P&EACUTE;REZ &#233;t&#xe9;",
    "ctrl\x00chars\x1fhere\x7f",
    "\x1b[31mred\x1b[0m text",
    "ſtraße STRASSE",
    "<start_of_text> literal",
    "Ⅻ ½ ² ३ ٣",
    "x\u0345y",
    LONG_PROMPT,
]

# Prompts with nothing that ftfy's mojibake repair (the step the fallback lacks) would touch.
ORDINARY = [p for p in PROMPTS if p != "x\u0345y"]


@pytest.fixture(scope="module")
def off_tok():
    official()
    from sam3.model.tokenizer_ve import SimpleTokenizer as OfficialTokenizer

    return OfficialTokenizer(bpe_path=bpe_path())


@pytest.fixture(scope="module")
def tok():
    return SimpleTokenizer()


def _ours(tok, prompts):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tok(prompts)


def rel_err(a: torch.Tensor, b: torch.Tensor):
    """(norm-relative error, max-abs error relative to max |b|)."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item(), ((a - b).abs().max() / b.abs().max()).item()


# ----------------------------------------------------------------------------------------------
# Tokenizer


@pytest.mark.parametrize("prompt", PROMPTS)
def test_tokenizer_matches_official(tok, off_tok, prompt):
    ref = off_tok([prompt], context_length=32)
    got = _ours(tok, [prompt])
    assert got.dtype == torch.long and got.shape == (1, 32)
    assert torch.equal(got, ref), (prompt, got.tolist(), ref.tolist())
    assert tok.encode(prompt) == off_tok.encode(prompt)


def test_tokenizer_batch_and_cache(tok, off_tok):
    ref = off_tok(PROMPTS, context_length=32)
    assert torch.equal(_ours(tok, PROMPTS), ref)
    hits = tok._tokenize.cache_info().hits
    assert torch.equal(_ours(tok, PROMPTS), ref)
    assert tok._tokenize.cache_info().hits == hits + len(PROMPTS)
    assert torch.equal(tok("a red car"), tok(["a red car"]))


def test_truncation_matches_official_and_warns(tok, off_tok):
    ids = tok.encode(LONG_PROMPT)
    assert len(ids) > 30
    with pytest.warns(UserWarning, match="truncated to 32 tokens"):
        row = tok([LONG_PROMPT])[0]
    # The official keeps the first 32 entries and overwrites the last with EOT.
    assert row.tolist() == [tok.sot_token_id] + ids[:30] + [tok.eot_token_id]
    assert torch.equal(row, off_tok([LONG_PROMPT], context_length=32)[0])
    exact = "word " * 29 + "end"  # 30 BPE tokens + SOT + EOT = 32: no truncation
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(tok([exact]), off_tok([exact], context_length=32))


@pytest.mark.parametrize("prompt", ["", "   ", "\t\n ", "\x00\x01", "&nbsp;"])
def test_empty_prompt_raises(tok, off_tok, prompt):
    # The official accepts it and returns <start_of_text> <end_of_text> then padding.
    ref = off_tok([prompt], context_length=32)[0]
    assert ref[:2].tolist() == [off_tok.sot_token_id, off_tok.eot_token_id] and not ref[2:].any()
    with pytest.raises(ValueError, match="empty text prompt"):
        tok([prompt])


def test_non_str_prompt_raises(tok):
    with pytest.raises(TypeError):
        tok([b"dog"])


def test_word_pattern_matches_regex_per_code_point():
    regex = pytest.importorskip("regex")
    official_pat = regex.compile(
        r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
        regex.IGNORECASE,
    )
    ours = tokmod._word_pattern()
    # Code points this Python's Unicode database leaves unassigned (newer in `regex`'s) may differ.
    chars = [chr(c) for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)) not in ("Cn", "Cs")]
    # Contexts that reveal each code point's class (letter run, digit, other run, dropped).
    for fmt in ("a{}a", "1{}1", "!{}!"):
        text = "\n".join(fmt.format(c) for c in chars)
        if ours.findall(text) != official_pat.findall(text):
            bad = [hex(ord(c)) for c in chars
                   if ours.findall(fmt.format(c)) != official_pat.findall(fmt.format(c))]
            raise AssertionError(f"{fmt!r}: {bad[:20]}")
    # The case-insensitive literals: same case variants for each of their letters.
    text = "\n".join(chars)
    for letter in set("".join(tokmod.SPECIAL_TOKENS) + "strvmld"):
        ref = regex.findall(letter, text, regex.IGNORECASE)
        assert re.findall(tokmod._ignore_case(letter), text) == ref, letter
    # whitespace_clean's \s
    ws = regex.compile(r"\s")
    assert [c for c in chars if ws.fullmatch(c)] == [c for c in chars if tokmod._WHITESPACE_RE.fullmatch(c)]


def test_without_ftfy_ordinary_prompts_identical(tok, off_tok, monkeypatch):
    monkeypatch.setattr(tokmod, "_ftfy", None)
    plain = SimpleTokenizer()  # fresh cache
    assert torch.equal(_ours(plain, ORDINARY), off_tok(ORDINARY, context_length=32))


def test_fix_text_fallback_equals_ftfy_except_mojibake():
    ftfy = pytest.importorskip("ftfy")
    for p in PROMPTS + ["line one\r\nline < two &amp;\n&amp; three", "a\u2028b\u2029c", "\ud83d\udc36 pair",
                        "&notit; this&not that", "NFC: e\u0301",
                        "c1 \x80 \x81 \x85 \x93q\x94 \x9d \x9f"]:
        assert tokmod._fix_text_fallback(p) == ftfy.fix_text(p), p
    # What the fallback does not do: ftfy's heuristic mojibake repair (fix_encoding).
    assert ftfy.fix_text("sÃ³") == "só" and tokmod._fix_text_fallback("sÃ³") == "sÃ³"


# ----------------------------------------------------------------------------------------------
# Text encoder


def _official_forward_text(backbone, prompts):
    with cpu_mode(), torch.no_grad():
        return backbone.forward_text(prompts, device="cpu")


def _check_parity(ours: TextEncoder, backbone, prompts, tol=1e-4):
    ref = _official_forward_text(backbone, prompts)
    with torch.no_grad():
        feats, mask, embeds = ours.encode(prompts)
    P, W = len(prompts), ours.encoder.width
    d = ours.resizer.out_features
    # The official is seq-first for features and embeds, batch-first for the mask.
    assert ref["language_features"].shape == (32, P, d) and ref["language_embeds"].shape == (32, P, W)
    assert feats.shape == (P, 32, d) and embeds.shape == (P, 32, W) and mask.shape == (P, 32)
    assert mask.dtype == torch.bool and torch.equal(mask, ref["language_mask"])
    ref_feats = ref["language_features"].transpose(0, 1)
    assert torch.equal(embeds, ref["language_embeds"].transpose(0, 1))
    errs = rel_err(feats, ref_feats)
    assert errs[0] < tol and errs[1] < tol, errs
    # Not degenerate: finite, spread over tokens and prompts.
    assert torch.isfinite(feats).all()
    assert feats.std(dim=1).mean() > 0.1 * feats.std() and feats.std(dim=0).mean() > 0.1 * feats.std()
    return errs


@pytest.fixture(scope="module")
def tiny_pair():
    cfg = get_config("tiny")
    backbone = build_official_image_model(cfg, enable_segmentation=False).backbone
    redraw_(backbone.language_backbone, seed=1)
    t = cfg.text
    ours = TextEncoder(d_model=cfg.d_model, width=t.width, heads=t.heads, layers=t.layers,
                       context_length=t.context_length, vocab_size=t.vocab_size, output_dim=t.output_dim).eval()
    ours.load_state_dict(backbone.language_backbone.state_dict(), strict=True)
    return ours, backbone


def test_state_dict_keys_match_official(tiny_pair):
    ours, backbone = tiny_pair
    ref = backbone.language_backbone.state_dict()
    got = ours.state_dict()
    assert list(got) == list(ref)
    assert all(got[k].shape == ref[k].shape for k in ref)


def test_text_encoder_matches_official_tiny(tiny_pair):
    ours, backbone = tiny_pair
    prompts = ["a red car", "dog!$", "the person on the left holding a cup", LONG_PROMPT, "東京タワー"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _check_parity(ours, backbone, prompts)
    # "dog!$" has a BPE id 0 before <end_of_text>, which the official (and we) mark as padding.
    ids = ours.tokenizer(["dog!$"])[0]
    assert ids[2] == 0 and ids[4] == ours.tokenizer.eot_token_id


def test_text_encoder_forward_on_ids(tiny_pair):
    ours, backbone = tiny_pair
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 49406, (3, 32), generator=g)
    ids[:, 0] = 49406
    ids[0, 10:] = 0
    ids[1, 31] = 49407
    enc = backbone.language_backbone
    with torch.no_grad():
        ref_tokens = enc.encoder(ids)[1]
        ref = enc.resizer(ref_tokens)
        feats, mask, embeds = ours(ids)
    assert torch.equal(mask, ids == 0)
    errs = rel_err(feats, ref)
    assert errs[0] < 1e-4 and errs[1] < 1e-4, errs
    # Causal: a later token never changes earlier features.
    ids2 = ids.clone()
    ids2[:, 20] = 1234
    with torch.no_grad():
        feats2 = ours(ids2)[0]
    assert torch.equal(feats2[:, :20], feats[:, :20]) and not torch.equal(feats2[:, 20:], feats[:, 20:])


@pytest.mark.slow
def test_text_encoder_matches_official_full_size():
    official()
    from sam3.model.text_encoder_ve import VETextEncoder
    from sam3.model.tokenizer_ve import SimpleTokenizer as OfficialTokenizer
    from sam3.model.vl_combiner import SAM3VLBackbone

    cfg = get_config("sam3")
    t = cfg.text
    torch.manual_seed(0)
    with cpu_mode():  # same constructor arguments as build_official_image_model
        text = VETextEncoder(
            tokenizer=OfficialTokenizer(bpe_path=bpe_path()), d_model=cfg.d_model, width=t.width,
            heads=t.heads, layers=t.layers, context_length=t.context_length, vocab_size=t.vocab_size,
        )
        backbone = SAM3VLBackbone(visual=nn.Identity(), text=text, scalp=1).eval()
    redraw_(backbone.language_backbone, seed=2)
    with torch.device("meta"):
        ours = TextEncoder(d_model=cfg.d_model, width=t.width, heads=t.heads, layers=t.layers,
                           context_length=t.context_length, vocab_size=t.vocab_size, output_dim=t.output_dim)
    ours.load_state_dict(backbone.language_backbone.state_dict(), strict=True, assign=True)
    ours.eval()
    _check_parity(ours, backbone, ["a red car", "the person on the left holding a white cup", "dog!$"])
