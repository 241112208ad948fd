"""Sequence-to-sequence tasks for the encoder–decoder, generated from a seed (nothing downloaded).

* ``translate``: sentences of a small English-like grammar (subject–verb–object, determiners,
  stacked adjectives, prepositional phrases, adverbs) mapped to an invented second language with
  its own vocabulary and morphology: subject–object–verb order, adjectives after the noun in
  mirrored order, determiners after the noun phrase, postpositions instead of prepositions,
  nominative/accusative/oblique case and number fused into noun and adjective forms, and verbs
  marked for tense *and* the subject's number (which the English past tense does not show, so
  the decoder must look back to the subject noun or determiner).
* ``reverse``, ``sort``: symbol strings, reversed / sorted.
* ``add``: two numbers of 1–5 digits and their sum, digit by digit, least significant digit
  first and zero-padded to 5 digits (the sum to 6): digit i of every number sits at a fixed
  position, and the carry flows in the decoder's own left-to-right order. (Written most
  significant digit first, the first output digit depends on every carry at once, and the
  default budget learns little of the task.)

Every sentence is a word list; the token ids come from the task's fixed vocabulary (the special
ids 0/1/2 are ``<pad>``/``<bos>``/``<eos>``, the :class:`~transformer_jax.config.ModelConfig`
defaults; one vocabulary for both sides, as with the paper's shared BPE, §5.1).

Splits are disjoint by content: an example belongs to train, validation or test by a hash of its
source sentence (5% test, 5% validation), whatever the seed. Training batches are a pure function
of ``(seed, step)``, so a resumed run sees exactly the batches of an uninterrupted one; the
validation and test sets are fixed lists of distinct examples drawn from the seed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Literal

import numpy as np

__all__ = ["SPECIALS", "TASKS", "Seq2SeqTask", "Split", "get_task"]

SPECIALS = ("<pad>", "<bos>", "<eos>")
PAD, BOS, EOS = 0, 1, 2

Split = Literal["train", "validation", "test"]
Words = list[str]
Example = tuple[Words, Words]

_STREAM = {"train": 0x7472, "validation": 0x7661, "test": 0x7465}  # per-split rng streams


def _split_of(src: Words) -> Split:
    """The split a source sentence belongs to: a stable hash, independent of seed and task."""
    h = int.from_bytes(hashlib.blake2b(" ".join(src).encode(), digest_size=4).digest(), "little")
    bucket = h % 100
    return "test" if bucket < 5 else "validation" if bucket < 10 else "train"


class Seq2SeqTask:
    """A generated sequence-to-sequence task.

    Args:
      name: the task's name (``train.py --task``).
      words: the task's vocabulary (both languages), without the special tokens.
      sample: ``rng -> (source words, target words)``, one random example.
      max_src_len: S, the longest source sentence.
      max_tgt_len: the longest target sentence (without ``<eos>``).
    """

    def __init__(self, name: str, words: list[str], sample: Callable[[np.random.Generator],
                 Example], max_src_len: int, max_tgt_len: int):
        self.name = name
        self.vocab = SPECIALS + tuple(dict.fromkeys(words))
        self.ids = {w: i for i, w in enumerate(self.vocab)}
        self._sample = sample
        self.max_src_len = max_src_len
        self.max_tgt_len = max_tgt_len

    @property
    def vocab_size(self) -> int:
        """V: specials plus the task's words."""
        return len(self.vocab)

    @property
    def src_len(self) -> int:
        """S, source columns: the longest sentence and its ``<eos>``."""
        return self.max_src_len + 1

    @property
    def width(self) -> int:
        """Columns of a packed batch: S source + BOS + target + EOS."""
        return self.src_len + self.max_tgt_len + 2

    # ---- text <-> ids ---------------------------------------------------------------------

    def encode(self, words: Words) -> list[int]:
        """Words -> ids; raises ``ValueError`` naming every word outside the vocabulary."""
        unknown = [w for w in words if w not in self.ids or self.ids[w] < len(SPECIALS)]
        if unknown:
            raise ValueError(f"not in the {self.name} vocabulary: {', '.join(map(repr, unknown))}")
        return [self.ids[w] for w in words]

    def decode(self, ids) -> Words:
        """Ids -> words, stopping at the first ``<eos>`` and dropping padding."""
        out = []
        for i in np.asarray(ids).tolist():
            if i == EOS:
                break
            if i not in (PAD, BOS):
                out.append(self.vocab[i])
        return out

    def source_ids(self, sentences: list[Words]) -> np.ndarray:
        """[B, S] int32 source ids: the words, ``<eos>``, then ``<pad>``.

        The ``<eos>`` marks where the sentence ends (as in fairseq and T5): padding is masked
        out of attention, so without it nothing the encoder sees shows the last word.
        """
        src = np.full((len(sentences), self.src_len), PAD, np.int32)
        for b, words in enumerate(sentences):
            if len(words) > self.max_src_len:
                raise ValueError(f"source has {len(words)} words; the {self.name} task allows "
                                 f"at most {self.max_src_len}")
            src[b, :len(words) + 1] = [*self.encode(words), EOS]
        return src

    def pack(self, examples: list[Example]) -> np.ndarray:
        """[B, S + T + 2] int32: source (padded) | ``<bos>`` target ``<eos>`` (padded)."""
        out = np.full((len(examples), self.width), PAD, np.int32)
        out[:, :self.src_len] = self.source_ids([s for s, _ in examples])
        for b, (_, tgt) in enumerate(examples):
            row = [BOS, *self.encode(tgt), EOS]
            out[b, self.src_len:self.src_len + len(row)] = row
        return out

    # ---- examples -------------------------------------------------------------------------

    def _draw(self, rng: np.random.Generator, split: Split) -> Example:
        while True:  # rejection: ~90% of draws are training examples, ~5% each of the others
            src, tgt = self._sample(rng)
            if _split_of(src) == split:
                return src, tgt

    def batch(self, seed: int, step: int, batch_size: int) -> np.ndarray:
        """The training batch of ``step``: [B, S + T + 2] int32, a pure function of (seed, step)."""
        rng = np.random.default_rng([seed, _STREAM["train"], step])
        return self.pack([self._draw(rng, "train") for _ in range(batch_size)])

    def batches(self, seed: int, step: int, num_steps: int, batch_size: int) -> np.ndarray:
        """[k, B, S + T + 2]: the batches of steps ``step … step + k - 1``."""
        return np.stack([self.batch(seed, s, batch_size) for s in range(step, step + num_steps)])

    def examples(self, split: Split, n: int, seed: int = 0) -> list[Example]:
        """``n`` distinct examples of ``split`` (the first n of the seed's stream)."""
        rng = np.random.default_rng([seed, _STREAM[split]])
        seen: dict[str, Example] = {}
        for _ in range(200 * n):  # small tasks may have fewer than n distinct examples
            src, tgt = self._draw(rng, split)
            seen.setdefault(" ".join(src), (src, tgt))
            if len(seen) == n:
                break
        return list(seen.values())


# ---- the translation grammar ------------------------------------------------------------------

# English noun (singular, plural) -> invented root. Target forms fuse root, number and case.
_NOUNS = {("cat", "cats"): "mavu", ("dog", "dogs"): "dorel", ("bird", "birds"): "kipo",
          ("child", "children"): "tansa", ("teacher", "teachers"): "velim",
          ("farmer", "farmers"): "rosko", ("horse", "horses"): "bule", ("king", "kings"): "gandi",
          ("woman", "women"): "sorim", ("man", "men"): "fela", ("fox", "foxes"): "truko",
          ("wolf", "wolves"): "lopa"}
_ADJECTIVES = {"big": "grand", "small": "pit", "red": "ruz", "old": "mal", "young": "jun",
               "happy": "gaj", "angry": "kol", "green": "verd", "tall": "alt", "quiet": "kvit"}
# English verb (3rd singular present, plural present, past) -> root; target adds tense + number.
_VERBS = {("sees", "see", "saw"): "vid", ("chases", "chase", "chased"): "cas",
          ("likes", "like", "liked"): "sat", ("helps", "help", "helped"): "hep",
          ("follows", "follow", "followed"): "sek", ("finds", "find", "found"): "trov",
          ("watches", "watch", "watched"): "rig", ("calls", "call", "called"): "vok",
          ("visits", "visit", "visited"): "vizt", ("feeds", "feed", "fed"): "nut"}
_PREPOSITIONS = {"near": "pok", "with": "kun", "under": "sub", "behind": "post"}
_ADVERBS = {"quickly": "rape", "slowly": "lante", "often": "ofte", "today": "hodia"}
# English determiner -> (number it requires: "sg", "pl" or None for either; target word by
# number, "" for none). Determiners follow the noun phrase in the target language.
_DETERMINERS = {"the": (None, {"sg": "ko", "pl": "ko"}), "a": ("sg", {"sg": ""}),
                "some": ("pl", {"pl": "kelk"}), "this": ("sg", {"sg": "ita"}),
                "these": ("pl", {"pl": "itaj"}), "two": ("pl", {"pl": "du"}),
                "three": ("pl", {"pl": "tri"})}
_NUMBER = {"sg": "", "pl": "i"}
_CASE = {"nom": "", "acc": "n", "obl": "e"}
_TENSE_SUFFIX = {"present": "as", "past": "is"}
_VERB_NUMBER = {"sg": "", "pl": "u"}


def _form(root: str, number: str, case: str) -> str:
    return root + _NUMBER[number] + _CASE[case]


def _noun_phrase(rng: np.random.Generator, case: str, depth: int) -> tuple[Words, Words, str]:
    """(English words, target words, number) of a noun phrase in ``case``."""
    det = list(_DETERMINERS)[rng.integers(len(_DETERMINERS))]
    need, det_forms = _DETERMINERS[det]
    number = need or ("sg", "pl")[rng.integers(2)]
    nouns = list(_NOUNS)
    noun = nouns[rng.integers(len(nouns))]
    adjs = [list(_ADJECTIVES)[i] for i in
            rng.choice(len(_ADJECTIVES), size=rng.choice(3, p=[0.5, 0.35, 0.15]), replace=False)]
    src = [det, *adjs, noun[0 if number == "sg" else 1]]
    # Target: noun, adjectives in mirrored order (agreeing in number and case), determiner.
    tgt = [_form(_NOUNS[noun], number, case)]
    tgt += [_form(_ADJECTIVES[a] + "a", number, case) for a in reversed(adjs)]
    tgt += [det_forms[number]] if det_forms[number] else []
    if depth == 0 and rng.random() < 0.3:  # a prepositional phrase -> a postpositional one
        prep = list(_PREPOSITIONS)[rng.integers(len(_PREPOSITIONS))]
        inner_src, inner_tgt, _ = _noun_phrase(rng, "obl", depth + 1)
        src += [prep, *inner_src]
        tgt += [*inner_tgt, _PREPOSITIONS[prep]]
    return src, tgt, number


def _translate_sample(rng: np.random.Generator) -> Example:
    subj_src, subj_tgt, number = _noun_phrase(rng, "nom", 0)
    obj_src, obj_tgt, _ = _noun_phrase(rng, "acc", 0)
    verbs = list(_VERBS)
    verb = verbs[rng.integers(len(verbs))]
    tense = ("present", "past")[rng.integers(2)]
    verb_src = verb[2] if tense == "past" else verb[0 if number == "sg" else 1]
    verb_tgt = _VERBS[verb] + _TENSE_SUFFIX[tense] + _VERB_NUMBER[number]
    adv = list(_ADVERBS)[rng.integers(len(_ADVERBS))] if rng.random() < 0.5 else None
    src = [*subj_src, verb_src, *obj_src] + ([adv] if adv else [])
    tgt = [*subj_tgt, *obj_tgt] + ([_ADVERBS[adv]] if adv else []) + [verb_tgt]  # S O (Adv) V
    return src, tgt


def _translate_words() -> list[str]:
    english = [w for pair in _NOUNS for w in pair] + list(_ADJECTIVES) + \
        [w for forms in _VERBS for w in forms] + list(_PREPOSITIONS) + list(_ADVERBS) + \
        list(_DETERMINERS)
    target = [_form(r, n, c) for r in _NOUNS.values() for n in _NUMBER for c in _CASE]
    target += [_form(r + "a", n, c) for r in _ADJECTIVES.values() for n in _NUMBER for c in _CASE]
    target += [r + t + n for r in _VERBS.values() for t in _TENSE_SUFFIX.values()
               for n in _VERB_NUMBER.values()]
    target += list(_PREPOSITIONS.values()) + list(_ADVERBS.values())
    target += [w for _, forms in _DETERMINERS.values() for w in forms.values() if w]
    return english + target


# A noun phrase is at most det + 2 adjectives + noun + preposition + the same again: 9 words.
_TRANSLATE_MAX = 9 + 1 + 9 + 1


# ---- algorithmic tasks -------------------------------------------------------------------------

_SYMBOLS = [chr(ord("a") + i) for i in range(20)]
_DIGITS = [str(d) for d in range(10)]


def _symbols(rng: np.random.Generator, low: int = 3, high: int = 16) -> Words:
    return [_SYMBOLS[i] for i in rng.integers(len(_SYMBOLS), size=rng.integers(low, high + 1))]


def _reverse_sample(rng: np.random.Generator) -> Example:
    src = _symbols(rng)
    return src, src[::-1]


def _sort_sample(rng: np.random.Generator) -> Example:
    src = _symbols(rng)
    return src, sorted(src, key=_SYMBOLS.index)


def _add_sample(rng: np.random.Generator) -> Example:
    def number():  # 1 to 5 digits, each length equally likely
        digits = int(rng.integers(1, 6))
        return int(rng.integers(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits))

    a, b = number(), number()
    return [*f"{a:05d}"[::-1], "+", *f"{b:05d}"[::-1]], list(f"{a + b:06d}"[::-1])


TASKS: dict[str, Callable[[], Seq2SeqTask]] = {
    "translate": lambda: Seq2SeqTask("translate", _translate_words(), _translate_sample,
                                     _TRANSLATE_MAX, _TRANSLATE_MAX),
    "reverse": lambda: Seq2SeqTask("reverse", _SYMBOLS, _reverse_sample, 16, 16),
    "sort": lambda: Seq2SeqTask("sort", _SYMBOLS, _sort_sample, 16, 16),
    "add": lambda: Seq2SeqTask("add", [*_DIGITS, "+"], _add_sample, 11, 6),
}
"""``--task`` name -> constructor of the task."""


def get_task(name: str) -> Seq2SeqTask:
    """The task called ``name`` (a key of :data:`TASKS`)."""
    if name not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {name!r}")
    return TASKS[name]()
