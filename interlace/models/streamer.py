"""Generation steps as they happen: `StepStreamer` and the incremental `Detokenizer` it uses.

`generate` hands every chosen token to a Hugging Face streamer (`put`) after the step's forward, so
by then the interleaver has run every node of that step. `StepStreamer` is such a streamer: at each
step it collects the tokens, the text they add and the values saved since the previous step into a
`Step` for its callback, stops the generation when the run was cancelled, and passes everything on
to a streamer of the user's own (`streamer=`).
"""

from __future__ import annotations

import tokenizers
import torch
from tokenizers.decoders import DecodeStream

from ..errors import CancelledError
from ..stream import Step

_CONTEXT = 4  # prompt tokens decoded before the first new one, so it keeps its leading space


class Detokenizer:
    """Each row's new text, token by token, as decoding the whole sequence would give it.

    A token can end in the middle of a character (a multi-byte UTF-8 character split over byte
    tokens) or change how the previous one decodes (merged pieces, a leading space): so a short
    window of each row is decoded, and new text is handed out only once it no longer ends in an
    incomplete character (U+FFFD).

    >>> import tokenizers, transformers
    >>> from tokenizers import decoders, models, pre_tokenizers
    >>> byte_level = sorted(pre_tokenizers.ByteLevel.alphabet())  # one token per byte
    >>> bpe = tokenizers.Tokenizer(models.BPE({c: i for i, c in enumerate(byte_level)}, []))
    >>> bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    >>> tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe)
    >>> detokenizer = Detokenizer(tokenizer, [[]])
    >>> [detokenizer.add([token])[0] for token in tokenizer.encode("ok 🙂")]
    ['o', 'k', ' ', '', '', '', '🙂']
    """

    def __init__(self, tokenizer, prompts: list[list[int]]):
        self.tokenizer = tokenizer
        self.ids = [list(prompt[-_CONTEXT:]) for prompt in prompts]
        backend = getattr(tokenizer, "_tokenizer", None)
        self.streams = None
        if isinstance(backend, tokenizers.Tokenizer) and not getattr(tokenizer, "clean_up_tokenization_spaces", True):
            # the tokenizers library's own incremental decoder does the same in Rust: 0.8 µs a token where
            # decoding two windows costs 6 (25 between a generation's steps). Not where decode cleans up spaces.
            self.backend, self.streams = backend, [DecodeStream(ids, skip_special_tokens=True) for ids in self.ids]
        self.start = [0] * len(prompts)  # where each row's window begins
        self.shown = [len(ids) for ids in self.ids]  # tokens whose text was handed out

    def add(self, tokens) -> list[str]:
        """The text each row's new token adds ("" while a character is still incomplete)."""
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.tolist()  # (one call: a 0-d tensor for each row costs more than its decoding)
        if self.streams is not None:
            backend = self.backend
            return [stream.step(backend, token) or "" for stream, token in zip(self.streams, tokens)]
        return [self._add(row, token) for row, token in enumerate(tokens)]

    def _add(self, row: int, token: int) -> str:
        ids, start, shown = self.ids[row], self.start[row], self.shown[row]
        ids.append(token)
        before = self._decode(ids[start:shown])
        after = self._decode(ids[start:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self.start[row], self.shown[row] = shown, len(ids)
        return after[len(before):]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


class StepStreamer:
    """A Hugging Face streamer that turns each generation step into a `Step` for `on_step(step, interleaver)`.

    detokenizer: None (no tokenizer: steps carry no text). forward: the user's own streamer, which
    gets every call it would get without this one. made: None, or `made(index, tokens)` after each step.
    """

    def __init__(self, interleaver, on_step, detokenizer: Detokenizer | None, forward=None, made=None):
        self.interleaver, self.on_step = interleaver, on_step
        self.detokenizer, self.forward, self.made = detokenizer, forward, made
        self.index = -1  # the first put is the prompt
        self.reported = 0  # results already handed out
        self.lengths: dict[int, int] = {}  # saved lists: items already handed out

    def put(self, tokens) -> None:
        if self.interleaver.is_cancelled():
            if self.forward is not None:  # the user's streamer ends as a whole run's does (a reader of it stops)
                self.forward.end()
            raise CancelledError("the generation was cancelled")
        if self.forward is not None:
            self.forward.put(tokens)
        if self.index < 0:
            self.index = 0
            return
        if self.on_step is not None:
            text = self.detokenizer.add(tokens) if self.detokenizer is not None else None
            values, items = self._saved()
            self.on_step(Step(self.index, tokens, text, values, items), self.interleaver)
        if self.made is not None:
            self.made(self.index, tokens)
        self.index += 1

    def end(self) -> None:
        if self.forward is not None:
            self.forward.end()

    def _saved(self) -> tuple[dict, dict]:
        """(values saved since the last step, the items each saved list gained since then)."""
        results = self.interleaver.results
        values, items = {}, {}
        for number, (index, value) in enumerate(results.items()):
            if type(value) is list:
                seen = self.lengths.get(index, 0)  # (a list that gained nothing in the step: its empty list)
                items[index], self.lengths[index] = value[seen:], len(value)
            elif number >= self.reported:
                values[index] = value
        self.reported = len(results)
        return values, items
