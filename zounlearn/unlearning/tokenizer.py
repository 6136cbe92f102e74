"""The embedded model's tokenizer: word-level over GPT-2's byte-level pre-tokenizer, no download.

A word is one token, so a fact (a city, a year, a name's halves) is one or a few tokens and
a tiny model learns the synthetic people in seconds. The vocabulary is fixed by the
synthetic vocabularies and templates (not by a seed), so one tokenizer serves every seed,
and GPT-2's pre-tokenizer keeps the leading space on a word ("Ġword"), so decoding gives
the text back exactly. Every word is in the vocabulary with and without its space; so are
the ASCII digits and punctuation one by one; anything else becomes <|unk|>.
"""

from __future__ import annotations

import re
import string

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from . import synthetic

PAD, EOS, UNK = "<|pad|>", "<|endoftext|>", "<|unk|>"
_PLACEHOLDER = re.compile(r"\{\w+\}")


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The tokenizer of the embedded model; the same vocabulary, ids and behaviour every call."""
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    words = {piece for text in _texts() for word in text.split() for piece, _ in pre.pre_tokenize_str(word)}
    words |= set(string.digits) | set(string.punctuation)
    # " x" pre-tokenizes to "Ġx": the spaced twin of every word, and the bare space and newline.
    spaced = {pre.pre_tokenize_str(" " + w)[0][0] for w in words} | {pre.pre_tokenize_str(c)[0][0] for c in " \n"}
    vocab = {token: i for i, token in enumerate([PAD, EOS, UNK, *sorted(words | spaced)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.pre_tokenizer = pre
    backend.decoder = decoders.ByteLevel()
    # GPT-2's convention: nothing is added when encoding; the training data ends each sequence with eos.
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, eos_token=EOS, bos_token=EOS,
                                   unk_token=UNK, model_max_length=1024)


def _texts() -> list[str]:
    """Every string the synthetic people are made of, placeholders removed."""
    values = [v for vocabulary in synthetic.VOCABULARY.values() for v in vocabulary]
    templates = [t for group in synthetic.TEMPLATES.values() for t in group] + list(synthetic.QUESTIONS.values()) \
        + list(synthetic.PARAPHRASES.values())
    return [*synthetic.FIRST_NAMES, *synthetic.SURNAMES, *values, "a an",
            *(_PLACEHOLDER.sub(" ", t) for t in templates)]
