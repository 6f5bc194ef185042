"""Constrained decoding: output that follows a JSON schema (or is any JSON object), by masking every
token that cannot continue it. The grammar engine is llguidance's (a maintained library); this module
only introduces it to our tokenizers and to the decoding loop (engine.Decoding's `constraint`)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from .errors import EdgeInferError
from .tokenizer import Tokenizer

# Compact JSON: with free whitespace a small model can pad an object with blank lines until max_tokens.
JSON_OPTIONS = {"whitespace_flexible": False}


class GrammarError(EdgeInferError):
    """A schema the grammar library cannot follow."""


class Grammars:
    """Makes constraints for one model's tokenizer (the library's view of the vocabulary is built
    once: about 0.2 s for a 49k vocabulary)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        import llguidance

        self._llg, self.vocab_size = llguidance, vocab_size
        eos = list(tokenizer.eos_ids)
        pieces = tokenizer.pieces()
        if pieces is None:
            self.tokenizer = llguidance.LLTokenizer(tokenizer.spec.data.decode(), n_vocab=vocab_size, eos_token=eos)
        else:
            self.tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Pieces(tokenizer, *pieces)),
                                                    n_vocab=vocab_size, eos_token=eos)

    def json(self, schema: dict[str, Any] | None) -> "Constraint":
        """Any JSON object (schema None), or one valid under `schema`."""
        grammar = self._llg.LLMatcher.grammar_from_json_schema(
            json.dumps({"type": "object"} if schema is None else schema), defaults=JSON_OPTIONS)
        error = self._llg.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error:
            raise GrammarError(f"the JSON schema cannot be used: {error}")
        return Constraint(self._llg.LLMatcher(self.tokenizer, grammar), self.vocab_size)


class Constraint:
    """One sequence's grammar state: masks the logits of tokens it forbids, follows the sampled ones."""

    def __init__(self, matcher, vocab_size: int):
        from llguidance.numpy import allocate_token_bitmask

        self.matcher, self._bits = matcher, allocate_token_bitmask(1, vocab_size)
        ids = np.arange(vocab_size)
        self._word, self._bit = ids >> 5, (ids & 31).astype(np.int32)  # where each token's bit is

    def mask(self, logits: np.ndarray) -> np.ndarray:
        from llguidance.numpy import fill_next_token_bitmask

        fill_next_token_bitmask(self.matcher, self._bits)
        allowed = (self._bits[0][self._word] >> self._bit) & 1
        return np.where(allowed[:logits.shape[0]].astype(bool), logits, -np.inf)

    def accept(self, token: int) -> bool:
        """Follow `token`; whether the grammar is now complete (nothing may follow)."""
        if not self.matcher.consume_token(token):
            raise EdgeInferError(f"the grammar refused token {token}: {self.matcher.get_error()}")
        return self.matcher.is_stopped()


class _Pieces:
    """A sentencepiece vocabulary as llguidance's TokenizerWrapper reads one."""

    def __init__(self, tokenizer: Tokenizer, tokens: list[bytes], special: list[int]):
        self.tokens, self.special_token_ids, self._tok = tokens, special, tokenizer
        self.eos_token_id, self.bos_token_id = tokenizer.eos_ids[0], tokenizer.bos_id

    def __call__(self, text: str | bytes) -> list[int]:
        return self._tok.encode(text.decode("utf-8", "replace") if isinstance(text, bytes) else text, add_bos=False)
