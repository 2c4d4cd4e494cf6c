"""CLIP byte-level BPE tokenizer, as the official ``sam3.model.tokenizer_ve.SimpleTokenizer``
(``clean="lower"``) used by SAM 3's text encoder.

    prompt -> clean: ftfy.fix_text, html.unescape twice, strip, collapse whitespace runs to " ", lower()
           -> words: special tokens | 's 't 're 've 'm 'll 'd | letter runs | one digit | other runs
           -> UTF-8 bytes -> printable unicode -> BPE merges (rank order) -> ids in [0, 49408)
    row    =  [SOT 49406] + ids + [EOT 49407], zero padded to the context length (32) -> (N, 32) int64

Over-long prompts are cut exactly as the official does: the row keeps its first 32 entries and the
last one is overwritten by EOT, i.e. SOT + the first 30 BPE tokens + EOT (a warning says so here).
Id 0 is a real token (the byte "!" not at the end of a word, e.g. in "dog!$") and padding is 0 too:
the text encoder's mask (``ids == 0``) marks both as padding, like the official.

Differences from the official, on purpose: an empty prompt (no token after cleaning, e.g. "" or
"   ") raises ValueError (the official silently encodes it as SOT, EOT); tokenized prompts are
cached. Without ``ftfy`` installed, see :func:`_fix_text_fallback` for the one step that differs.
"""

from __future__ import annotations

import functools
import gzip
import html
import html.entities
import itertools
import os
import re
import sys
import unicodedata
import warnings
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

try:  # optional: only its mojibake repair is not reproduced without it
    import ftfy as _ftfy
except ImportError:  # pragma: no cover - exercised by forcing the fallback in tests
    _ftfy = None

DEFAULT_BPE_PATH = os.path.join(
    os.path.dirname(os.path.dirname(__file__)), "assets", "bpe_simple_vocab_16e6.txt.gz"
)
DEFAULT_CONTEXT_LENGTH = 32
SPECIAL_TOKENS = ("<start_of_text>", "<end_of_text>")


# ----------------------------------------------------------------------------------------------
# Text cleaning


def _fix_text_fallback(text: str) -> str:
    """``ftfy.fix_text`` (ftfy 6.3, default config) minus ``fix_encoding``.

    Reproduced exactly: lines are fixed one at a time until nothing changes; HTML entities that end
    in ";" (plus ftfy's upper-case Latin ones) are decoded unless a "<" was seen on this or an
    earlier line; C1 controls U+0080-U+009F read as Windows-1252 (U+0085 -> "…"); Latin ligatures
    split (ﬁ -> fi); full/half-width forms and U+3000 folded; curly quotes straightened;
    CR/CRLF/U+2028/U+2029 -> "\\n"; UTF-16 surrogates joined; ANSI terminal escapes and invisible
    control characters removed; NFC.
    Not reproduced: ``fix_encoding``, the heuristic mojibake repair (e.g. "sÃ³" -> "só",
    "voilÃ le" -> "voilà le"). Text typed as valid Unicode has no mojibake and is unaffected.
    """
    unescape = True
    out = []
    pos = 0
    while pos < len(text):
        brk = text.find("\n", pos) + 1 or len(text)
        segment = text[pos:brk]
        if "<" in segment:
            unescape = False  # ftfy keeps this off for the rest of the text
        while True:
            orig = segment
            if unescape:
                segment = _HTML_ENTITY_RE.sub(_unescape_entity, segment)
            segment = segment.translate(_fallback_tables()["c1_ligatures_width"])
            segment = _SINGLE_QUOTE_RE.sub("'", _DOUBLE_QUOTE_RE.sub('"', segment))
            segment = (
                segment.replace("\r\n", "\n").replace("\r", "\n").replace("\u2028", "\n")
                .replace("\u2029", "\n").replace("\u0085", "\n")
            )
            if _SURROGATE_RE.search(segment):
                segment = _SURROGATE_PAIR_RE.sub(_join_surrogates, segment)
                segment = _SURROGATE_RE.sub("\ufffd", segment)
            segment = _ANSI_RE.sub("", segment)
            segment = segment.translate(_fallback_tables()["control"])
            segment = unicodedata.normalize("NFC", segment)
            if segment == orig:
                break
        out.append(segment)
        pos = brk
    return "".join(out)


_HTML_ENTITY_RE = re.compile(r"&#?[0-9A-Za-z]{1,24};")
_SINGLE_QUOTE_RE = re.compile("[\u02bc\u2018-\u201b]")
_DOUBLE_QUOTE_RE = re.compile("[\u201c-\u201f]")
_SURROGATE_RE = re.compile("[\ud800-\udfff]")
_SURROGATE_PAIR_RE = re.compile("[\ud800-\udbff][\udc00-\udfff]")
_ANSI_RE = re.compile("\033\\[((?:\\d|;)*)([a-zA-Z])")
_LIGATURES = {
    "Ĳ": "IJ", "ĳ": "ij", "ŉ": "ʼn", "Ǳ": "DZ", "ǲ": "Dz", "ǳ": "dz", "Ǆ": "DŽ", "ǅ": "Dž", "ǆ": "dž",
    "Ǉ": "LJ", "ǈ": "Lj", "ǉ": "lj", "Ǌ": "NJ", "ǋ": "Nj", "ǌ": "nj",
    "ﬀ": "ff", "ﬁ": "fi", "ﬂ": "fl", "ﬃ": "ffi", "ﬄ": "ffl", "ﬅ": "ſt", "ﬆ": "st",
}


@functools.lru_cache(maxsize=None)
def _fallback_tables() -> Dict[str, dict]:
    # fix_c1_controls, fix_latin_ligatures and fix_character_width run in this order in ftfy; no
    # output of one is an input of the next, so one table does all three.
    table = {cp: bytes([cp]).decode("cp1252", errors="ignore") or chr(cp) for cp in range(0x80, 0xA0)}
    table.update({ord(k): v for k, v in _LIGATURES.items()})
    table[0x3000] = " "
    for cp in range(0xFF01, 0xFFF0):
        alt = unicodedata.normalize("NFKC", chr(cp))
        if alt != chr(cp):
            table[cp] = alt
    control = dict.fromkeys(
        itertools.chain(range(0x00, 0x09), [0x0B], range(0x0E, 0x20), [0x7F], range(0x206A, 0x2070),
                        [0xFEFF], range(0xFFF9, 0xFFFD))
    )
    entities = {}
    for name, char in html.entities.html5.items():
        if name.endswith(";"):
            entities["&" + name] = char
            if name == name.lower():
                upper = "&" + name.upper()
                if html.unescape(upper) == upper:
                    entities[upper] = char.upper()
    return {"c1_ligatures_width": table, "control": control, "entities": entities}


def _unescape_entity(m: "re.Match[str]") -> str:
    text = m.group(0)
    entities = _fallback_tables()["entities"]
    if text in entities:
        return entities[text]
    if text.startswith("&#"):
        unescaped = html.unescape(text)
        return text if ";" in unescaped else unescaped
    return text


def _join_surrogates(m: "re.Match[str]") -> str:
    hi, lo = m.group(0)
    return chr(0x10000 + (ord(hi) - 0xD800) * 0x400 + (ord(lo) - 0xDC00))


def fix_text(text: str) -> str:
    """``ftfy.fix_text`` when ftfy is installed, else :func:`_fix_text_fallback`."""
    return _ftfy.fix_text(text) if _ftfy is not None else _fix_text_fallback(text)


# The official uses the `regex` package's `\s`: Unicode White_Space. Python's `re` `\s` also matches
# U+001C..U+001F, so the class is spelled out.
_WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
_WHITESPACE_RE = re.compile(f"[{_WHITESPACE}]+")


def clean_text(text: str) -> str:
    """The official ``clean="lower"``: ``whitespace_clean(basic_clean(text)).lower()``."""
    text = fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE_RE.sub(" ", text).strip().lower()


# ----------------------------------------------------------------------------------------------
# Word splitting


def _category_class(first_letter: str) -> str:
    cats = map(unicodedata.category, map(chr, range(sys.maxunicode + 1)))
    parts, cp = [], 0
    for is_in, run in itertools.groupby(cats, key=lambda c: c[0] == first_letter):
        n = sum(1 for _ in run)
        if is_in:
            a, b = re.escape(chr(cp)), re.escape(chr(cp + n - 1))
            parts.append(a if n == 1 else f"{a}-{b}")
        cp += n
    return "".join(parts)


def _ignore_case(literal: str) -> str:
    # What `regex`'s IGNORECASE (simple case folding) equates with each letter of the official
    # literals: the two ASCII cases, plus U+017F long s for "s" (and U+212A Kelvin for "k").
    extra = {"s": "\u017f", "k": "\u212a"}
    return "".join(
        f"[{c.lower()}{c.upper()}{extra.get(c.lower(), '')}]" if c.isalpha() else re.escape(c) for c in literal
    )


@functools.lru_cache(maxsize=None)
def _word_pattern() -> "re.Pattern[str]":
    # The official pattern is `regex`'s  special|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+
    # (IGNORECASE). Python's `re` has no \p{..}, so the letter and number classes are spelled out from
    # `unicodedata` (checked code point by code point against `regex` in tests/test_text.py). They
    # differ only on code points that this Python's Unicode database (14.0 on 3.11) leaves unassigned
    # and the `regex` package's newer one assigns; no `regex` dependency is needed for that.
    # `re`'s IGNORECASE would widen a spelled-out class by case variants (U+0345, a mark, would match
    # the letter class through its fold to iota), which `regex` does not do for \p{L}: so no
    # IGNORECASE here, the literals carry their case variants, and U+0345 (matched by neither class
    # in `regex`, hence dropped) is excluded from "other".
    letters, numbers = _category_class("L"), _category_class("N")
    literals = list(SPECIAL_TOKENS) + ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d"]
    return re.compile(
        "|".join(map(_ignore_case, literals))
        + rf"|[{letters}]+|[{numbers}]|[^{_WHITESPACE}{letters}{numbers}\u0345]+"
    )


# ----------------------------------------------------------------------------------------------
# BPE


@functools.lru_cache(maxsize=None)
def _bytes_to_unicode() -> Dict[int, str]:
    """Reversible byte -> printable character map (bytes that are printable map to themselves)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@functools.lru_cache(maxsize=4)
def _load_vocab(bpe_path: str) -> Tuple[Dict[str, int], Dict[Tuple[str, str], int]]:
    with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    # The official keeps merges 1 .. 48894 (line 0 is a header): 256 bytes x 2 + merges + 2 = 49408.
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + list(SPECIAL_TOKENS)
    return {tok: i for i, tok in enumerate(vocab)}, {m: i for i, m in enumerate(merges)}


class SimpleTokenizer:
    """Official-equivalent CLIP tokenizer with a prompt cache.

    ``tokenizer(texts, context_length=None) -> (N, context_length) int64`` (CPU). ``texts`` is a
    string or a list of strings. Raises ValueError for a prompt with no token after cleaning; warns
    (``UserWarning``) when a prompt is truncated.
    """

    def __init__(self, bpe_path: Union[str, os.PathLike] = DEFAULT_BPE_PATH,
                 context_length: int = DEFAULT_CONTEXT_LENGTH, cache_size: int = 4096):
        self.encoder, self.bpe_ranks = _load_vocab(os.fspath(bpe_path))
        self.decoder = {i: t for t, i in self.encoder.items()}
        self.byte_encoder = _bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        self.vocab_size = len(self.encoder)
        self.sot_token_id, self.eot_token_id = (self.encoder[t] for t in SPECIAL_TOKENS)
        self.context_length = context_length
        self.pat = _word_pattern()
        # Per instance, bounded: a server sees unbounded distinct prompts and words.
        self._bpe = functools.lru_cache(maxsize=65536)(self._bpe_uncached)
        self._tokenize = functools.lru_cache(maxsize=cache_size)(self._tokenize_uncached)

    def _bpe_uncached(self, token: str) -> str:
        if token in SPECIAL_TOKENS:
            return token
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        if len(word) == 1:
            return word[0]
        ranks = self.bpe_ranks
        while len(word) > 1:
            pairs = set(zip(word[:-1], word[1:]))
            bigram = min(pairs, key=lambda p: ranks.get(p, float("inf")))
            if bigram not in ranks:
                break
            first, second = bigram
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        return " ".join(word)

    def encode(self, text: str) -> List[int]:
        """BPE ids of one text, without SOT/EOT and without a length limit (official ``encode``)."""
        ids = []
        for word in self.pat.findall(clean_text(text)):
            word = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self._bpe(word).split(" "))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        text = "".join(self.decoder[int(i)] for i in ids)
        text = bytearray(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace")
        return text.replace("</w>", " ")

    def _tokenize_uncached(self, text: str, context_length: int) -> Tuple[Tuple[int, ...], int]:
        ids = self.encode(text)
        if not ids:
            raise ValueError(
                f"empty text prompt {text!r}: it has no token after cleaning (whitespace, control "
                "characters); give a noun phrase such as 'a red car'"
            )
        row = [self.sot_token_id] + ids + [self.eot_token_id]
        n = len(row)
        if n > context_length:
            row = row[:context_length]
            row[-1] = self.eot_token_id
        return tuple(row + [0] * (context_length - len(row))), n

    def tokenize(self, text: str, context_length: Optional[int] = None) -> Tuple[int, ...]:
        """One prompt -> its padded row of ``context_length`` ids (cached)."""
        if not isinstance(text, str):
            raise TypeError(f"a text prompt must be a str, got {type(text).__name__}")
        ctx = context_length or self.context_length
        row, n = self._tokenize(text, ctx)
        if n > ctx:
            warnings.warn(
                f"text prompt {text[:60]!r}{'...' if len(text) > 60 else ''} has {n} tokens with "
                f"<start_of_text>/<end_of_text>; truncated to {ctx} tokens as the official does "
                f"(the first {ctx - 2} BPE tokens are kept, then <end_of_text>)",
                stacklevel=3,
            )
        return row

    def __call__(self, texts: Union[str, Sequence[str]], context_length: Optional[int] = None) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        rows = [self.tokenize(t, context_length) for t in texts]
        return torch.tensor(rows, dtype=torch.long).view(len(rows), context_length or self.context_length)
