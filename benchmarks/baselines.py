"""The floors a translation model must clear: copying the source, and a translation memory.

* :func:`copy_scores`: the source itself as the hypothesis. Where source and target share
  names, numbers and format strings (program messages do), this already scores.
* :func:`memory_translate`: for each test source, the target of the most similar training
  source, by cosine similarity of character-trigram TF-IDF vectors: the fuzzy match a
  translator's memory (or gettext's ``msgmerge``) proposes.

Both are scored with sacreBLEU and chrF on detokenised text (:func:`scores`). The memory is
NumPy only: an inverted index from each trigram to the training sources that hold it, so a
test source's similarities to every training source are one ``np.bincount`` over the postings
of its trigrams (about 50k training and 1k test sources take seconds on one core).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import sacrebleu

__all__ = ["TrigramIndex", "copy_scores", "memory_translate", "scores"]


def scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict:
    """sacreBLEU (13a tokenisation of detokenised text) and chrF of ``hypotheses``."""
    bleu = sacrebleu.metrics.BLEU()
    chrf = sacrebleu.metrics.CHRF()
    return {"bleu": bleu.corpus_score(list(hypotheses), [list(references)]).score,
            "chrf": chrf.corpus_score(list(hypotheses), [list(references)]).score,
            "bleu_signature": str(bleu.get_signature()),
            "chrf_signature": str(chrf.get_signature())}


def copy_scores(sources: Sequence[str], references: Sequence[str]) -> dict:
    """The copy-the-source baseline's :func:`scores`."""
    return scores(sources, references)


def _trigrams(text: str) -> list[str]:
    padded = f" {text.lower()} "
    return [padded[i:i + 3] for i in range(len(padded) - 2)]


class TrigramIndex:
    """Character-trigram TF-IDF vectors of ``texts`` (L2-normalised), indexed by trigram.

    Weights: term frequency times ``log(N / df) + 1`` (the smoothed IDF), so a trigram that
    every text holds still counts a little.
    """

    def __init__(self, texts: Sequence[str]):
        self.vocab: dict[str, int] = {}
        docs, ids = [], []
        for d, text in enumerate(texts):
            grams = [self.vocab.setdefault(g, len(self.vocab)) for g in _trigrams(text)]
            ids.append(np.asarray(grams, np.int64))
            docs.append(np.full(len(grams), d, np.int64))
        self.n = len(texts)
        doc, gram = np.concatenate(docs or [np.zeros(0, np.int64)]), np.concatenate(
            ids or [np.zeros(0, np.int64)])
        # (doc, gram) pairs with their counts: the sparse term-frequency matrix.
        key, tf = np.unique(doc * max(len(self.vocab), 1) + gram, return_counts=True)
        doc, gram = key // max(len(self.vocab), 1), key % max(len(self.vocab), 1)
        df = np.bincount(gram, minlength=len(self.vocab))
        self.idf = np.log(max(self.n, 1) / np.maximum(df, 1)) + 1.0
        w = tf * self.idf[gram]
        norm = np.sqrt(np.bincount(doc, weights=w * w, minlength=self.n))
        w = w / np.maximum(norm[doc], 1e-12)
        order = np.argsort(gram, kind="stable")  # postings: by trigram, then document
        self.post_doc, self.post_w = doc[order], w[order]
        self.post_start = np.concatenate([[0], np.cumsum(df)])

    def query(self, text: str) -> np.ndarray:
        """[N] cosine similarity of ``text`` to every indexed text."""
        grams, counts = np.unique([self.vocab.get(g, -1) for g in _trigrams(text)],
                                  return_counts=True)
        known = grams >= 0
        grams, counts = grams[known], counts[known]
        if not grams.size:
            return np.zeros(self.n)
        q = counts * self.idf[grams]
        q = q / np.linalg.norm(q)
        spans = [np.arange(self.post_start[g], self.post_start[g + 1]) for g in grams]
        rows = np.concatenate(spans)
        weight = np.repeat(q, [len(s) for s in spans]) * self.post_w[rows]
        return np.bincount(self.post_doc[rows], weights=weight, minlength=self.n)


def memory_translate(train_sources: Sequence[str], train_targets: Sequence[str],
                     sources: Sequence[str]) -> list[str]:
    """For each of ``sources``, the target of its most similar training source (ties: the
    first in training order; no trigram in common: the empty string)."""
    index = TrigramIndex(train_sources)
    out = []
    for text in sources:
        sim = index.query(text)
        out.append(train_targets[int(np.argmax(sim))] if sim.size and sim.max() > 0 else "")
    return out
