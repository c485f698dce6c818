"""Captioning metrics as coco-caption computes them: corpus BLEU-4 and CIDEr-D, in pure Python/numpy.

Inputs map an image id to its reference captions and to one generated caption. Captions are tokenised like
coco-caption (Stanford PTBTokenizer, lowercased, punctuation tokens dropped) by `tokenize`, a regex
re-implementation that agrees with the Java tokenizer on ordinary caption text; pass `tokenized=True` for
text already tokenised (tokens split on whitespace).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence

import numpy as np

# Tokens coco-caption drops after PTB tokenisation (brackets survive, lowercased to -lrb- etc.).
DROPPED = {"''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";", '"'}
BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
SPLIT_WORDS = {"cannot": ("can", "not"), "gonna": ("gon", "na"), "wanna": ("wan", "na"), "gotta": ("got", "ta")}
CLITICS = ("'s", "'m", "'d", "'re", "'ll", "'ve")
TOKEN = re.compile(
    r"(?:[^\W\d_]\.){2,}"  # acronyms: u.s., p.m.
    r"|\d+(?:[.,:]\d+)+"  # numbers: 3.5, 1,000, 10:30
    r"|[^\W_]+(?:[-'./][^\W_]+)*"  # words, hyphenated or with an inner apostrophe or slash
    r"|\.\.\.|--|\S"  # anything else, one mark at a time
)


def tokenize(text: str) -> list[str]:
    """PTB-style tokens of `text` as coco-caption scores them: lowercased, clitics split, punctuation dropped."""
    tokens = []
    for token in TOKEN.findall(text.lower()):
        if token in SPLIT_WORDS:
            tokens += SPLIT_WORDS[token]
        elif token.endswith("n't") and len(token) > 3:
            tokens += [token[:-3], "n't"]
        elif token.endswith(CLITICS) and "'" in token[1:]:
            cut = token.rindex("'")
            tokens += [token[:cut], token[cut:]]
        elif token not in DROPPED:
            tokens.append(BRACKETS.get(token, token))
    return tokens


def _tokens(text: str, tokenized: bool) -> list[str]:
    return text.split() if tokenized else tokenize(text)


def _ngrams(words: Sequence[str], n: int) -> Counter:
    return Counter(tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def _check(references: Mapping[Hashable, Sequence[str]], hypotheses: Mapping[Hashable, str]) -> None:
    if set(references) != set(hypotheses):
        odd = next(iter(set(references) ^ set(hypotheses)))
        raise ValueError(f"references and hypotheses must cover the same images; image {odd!r} is in only one")
    if not references:
        raise ValueError("no captions to score")
    empty = [k for k, refs in references.items() if not refs]
    if empty:
        raise ValueError(f"image {empty[0]!r} has no reference captions")


def bleu(references: Mapping[Hashable, Sequence[str]], hypotheses: Mapping[Hashable, str], max_n: int = 4,
         tokenized: bool = False) -> float:
    """Corpus BLEU-`max_n` as coco-caption's `Bleu`: clipped n-gram counts summed over the corpus, the closest
    reference length per image (ties to the shorter), one brevity penalty for the corpus.

    A corpus with no matching n-gram of some order scores exactly 0 (coco-caption's 1e-15 smoothing leaves a
    tiny positive number there).
    """
    _check(references, hypotheses)
    correct, guessed = np.zeros(max_n), np.zeros(max_n)
    hyp_len = ref_len = 0
    for key, hypothesis in hypotheses.items():
        words = _tokens(hypothesis, tokenized)
        refs = [_tokens(r, tokenized) for r in references[key]]
        max_counts: Counter = Counter()
        for ref in refs:
            max_counts |= _ngrams(ref, max_n)
        for gram, count in _ngrams(words, max_n).items():
            correct[len(gram) - 1] += min(count, max_counts[gram])
        guessed += [max(0, len(words) - k) for k in range(max_n)]
        hyp_len += len(words)
        ref_len += min((abs(len(r) - len(words)), len(r)) for r in refs)[1]
    if not correct.all():
        return 0.0
    score = math.exp(np.mean(np.log(correct / guessed)))
    return score * math.exp(1 - ref_len / hyp_len) if hyp_len < ref_len else score


def cider_d_scores(references: Mapping[Hashable, Sequence[str]], hypotheses: Mapping[Hashable, str],
                   sigma: float = 6.0, max_n: int = 4, tokenized: bool = False) -> dict[Hashable, float]:
    """Per-image CIDEr-D as coco-caption's `CiderD` (pycocoevalcap's `Cider`).

    TF-IDF vectors of 1..`max_n`-grams, document frequencies counted over the references of the images scored
    here; hypothesis weights clipped at the reference's; a Gaussian length penalty (`sigma`) on the difference
    in bigram counts (coco-caption's length); averaged over n-gram orders and references, times 10.
    """
    _check(references, hypotheses)
    keys = list(hypotheses)
    refs = {k: [_ngrams(_tokens(r, tokenized), max_n) for r in references[k]] for k in keys}
    doc_freq: Counter = Counter()
    for k in keys:
        doc_freq.update(set().union(*refs[k]))
    log_images = math.log(len(keys))

    def vectors(counts: Counter):
        vec = [{} for _ in range(max_n)]
        for gram, tf in counts.items():
            vec[len(gram) - 1][gram] = tf * (log_images - math.log(max(1.0, doc_freq[gram])))
        norms = [math.sqrt(sum(w * w for w in v.values())) for v in vec]
        bigrams = sum(counts[g] for g in vec[1]) if max_n > 1 else 0
        return vec, norms, bigrams

    scores = {}
    for k in keys:
        vec, norms, length = vectors(_ngrams(_tokens(hypotheses[k], tokenized), max_n))
        total = np.zeros(max_n)
        for ref in refs[k]:
            ref_vec, ref_norms, ref_length = vectors(ref)
            penalty = math.exp(-((length - ref_length) ** 2) / (2 * sigma**2))
            for n in range(max_n):
                dot = sum(min(w, ref_vec[n].get(g, 0.0)) * ref_vec[n].get(g, 0.0) for g, w in vec[n].items())
                if norms[n] and ref_norms[n]:
                    dot /= norms[n] * ref_norms[n]
                total[n] += dot * penalty
        scores[k] = float(np.mean(total) / len(refs[k]) * 10.0)
    return scores


def cider_d(references: Mapping[Hashable, Sequence[str]], hypotheses: Mapping[Hashable, str], sigma: float = 6.0,
            max_n: int = 4, tokenized: bool = False) -> float:
    """Corpus CIDEr-D: the mean of `cider_d_scores` over the images."""
    return float(np.mean(list(cider_d_scores(references, hypotheses, sigma, max_n, tokenized).values())))
