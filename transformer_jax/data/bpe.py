"""The subword tokenizer: byte-level BPE trained with the Hugging Face ``tokenizers`` library.

Byte-level BPE (Radford et al. 2019, GPT-2 §2.2; Sennrich et al. 2016 for BPE) starts from the
256 bytes, so every string encodes and decoding is exact; merges learnt on the corpus make a
token stand for about four bytes of English instead of one. A language-model dataset has one
special token, :data:`EOT`, which ends each document; a parallel dataset has
:data:`PAIR_SPECIALS` (``<pad>``, ``<bos>``, ``<eos>`` at ids 0, 1, 2, the encoder–decoder's
defaults), its ``<eos>`` standing for EOT. :func:`load_tokenizer` reads either kind back from
the ``tokenizer.json`` of a prepared dataset or a run directory.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from transformer_jax.data.tokenizer import ByteTokenizer

__all__ = ["EOT", "MAX_VOCAB", "MIN_VOCAB", "PAIR_SPECIALS", "BPETokenizer", "load_tokenizer",
           "train_bpe"]

EOT = "<|endoftext|>"
"""The end-of-text token (GPT-2's name for it)."""

MIN_VOCAB = 257  # the 256 byte tokens and EOT: BPE with no merge at all
MAX_VOCAB = 1 << 20  # far above any published LM vocabulary (Gemma's 256k); ids fit uint32
PAIR_SPECIALS = ("<pad>", "<bos>", "<eos>")
"""The special tokens of a parallel dataset's tokenizer, in id order (ModelConfig's pad/bos/eos)."""


class BPETokenizer:
    """A trained byte-level BPE ``tokenizers.Tokenizer`` behind :class:`ByteTokenizer`'s methods."""

    kind = "bpe"

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        # Text that happens to contain "<|endoftext|>" is text: only the data path inserts EOT.
        # (A runtime setting: tokenizer.json does not store it.)
        self._tok.encode_special_tokens = True
        self.vocab_size = tokenizer.get_vocab_size()
        eot = tokenizer.token_to_id(EOT)
        if eot is None:  # a parallel dataset's tokenizer: <eos> ends a text
            eot = tokenizer.token_to_id(PAIR_SPECIALS[2])
        if eot is None:
            raise ValueError(f"the tokenizer has no {EOT} or {PAIR_SPECIALS[2]} token")
        self.eot_id = eot
        self.special_ids = tuple(sorted(tokenizer.get_added_tokens_decoder()))

    def encode(self, text: str) -> np.ndarray:
        """str -> [T] int32 token ids."""
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """:meth:`encode` of each text, in parallel over the cores (the library's thread pool)."""
        return [np.asarray(e.ids, np.int32)
                for e in self._tok.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids) -> str:
        """[T] ids -> str; :data:`EOT` shows as itself, a cut multi-byte char as U+FFFD."""
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}), got "
                             f"[{ids.min()}, {ids.max()}]")
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_bytes(self) -> np.ndarray:
        """[V] bytes of text each id stands for (special tokens such as :data:`EOT`: 0).

        A byte-level token is spelt in GPT-2's printable alphabet of 256 characters, one per
        byte, so its length in characters is its length in bytes.
        """
        lengths = np.zeros(self.vocab_size, np.int64)
        for i in range(self.vocab_size):
            if i not in self.special_ids:
                lengths[i] = len(self._tok.id_to_token(i))
        return lengths

    def to_json(self) -> str:
        """The library's ``tokenizer.json`` text (readable by ``Tokenizer.from_str`` too)."""
        return self._tok.to_str()


def train_bpe(texts: Iterable[str], vocab_size: int,
              specials: Sequence[str] = (EOT,)) -> BPETokenizer:
    """Learn byte-level BPE merges on ``texts`` up to ``vocab_size`` tokens (specials included).

    The vocabulary may come out smaller when the texts hold fewer distinct pairs than merges
    asked for. The same texts give the same tokenizer.

    Args:
      texts: the training text, in parts.
      vocab_size: V, the special tokens and the 256 bytes included.
      specials: the special tokens, given ids 0, 1, ... in this order: ``(EOT,)`` for a
        language model, :data:`PAIR_SPECIALS` for a parallel dataset.
    """
    least = 256 + len(specials)
    if not least <= vocab_size <= MAX_VOCAB:
        raise ValueError(f"--vocab-size must lie in [{least}, {MAX_VOCAB}] for bpe (256 "
                         f"bytes + {', '.join(specials)} at least), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return BPETokenizer(tok)


def load_tokenizer(text: str) -> ByteTokenizer | BPETokenizer:
    """The tokenizer of a ``tokenizer.json`` text (either kind).

    Raises:
      ValueError: the text is not a tokenizer of this package.
    """
    try:
        spec = json.loads(text)
        if isinstance(spec, dict) and spec.get("type") == ByteTokenizer.kind:
            return ByteTokenizer()
        return BPETokenizer(Tokenizer.from_str(text))
    except Exception as e:  # noqa: BLE001 (the library raises plain Exception)
        raise ValueError(f"not a tokenizer ({str(e).splitlines()[0][:120]})") from None
