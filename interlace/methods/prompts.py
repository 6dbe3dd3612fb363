"""Prompts with target tokens to track, and running many of them: `Prompt`, `run_prompts`.

A target word is tracked by the first token of both "word" and " word" (the word at the start of
a text and after a space usually tokenize differently); the probability of a target category is
the sum over its tokens, each counted once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm as auto_tqdm

from .getters import compute_next_token_probs, kept, progress


def get_first_tokens(words, tokenizer) -> list[int]:
    """The first token of each word, with and without a leading space, each once, in order.

    tokenizer: a tokenizer or a model with `.tokenizer`. A space that tokenizes on its own (so " word"
    starts with the space token) adds nothing; nnterp raises where "word" and " word" share their
    first token (tokenizers that add a prefix space), this keeps that one token.
    """
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    words = [words] if isinstance(words, str) else words
    space = tokenizer(" ", add_special_tokens=False)["input_ids"]
    tokens = []
    for word in words:
        for text in (word, " " + word):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if ids and ids[:1] != space[:1]:
                tokens.append(ids[0])
    return list(dict.fromkeys(tokens))


@dataclass
class Prompt:
    """A prompt and the tokens of each target category to track in its next-token distribution.

    >>> prompt = Prompt("The capital of France is", {"target": [7042], "traps": [4528, 24405]})
    >>> prompt.has_no_collisions()
    True
    """

    prompt: str
    target_tokens: dict[str, list[int]]
    target_strings: dict[str, str | list[str]] | None = None

    @classmethod
    def from_strings(cls, prompt: str, target_strings, tokenizer) -> "Prompt":
        """target_strings: `{category: word or words}`, or words alone (the category `"target"`)."""
        if isinstance(target_strings, (str, list)):
            target_strings = {"target": target_strings}
        tokens = {category: get_first_tokens(words, tokenizer) for category, words in target_strings.items()}
        return cls(prompt, tokens, target_strings)

    def has_no_collisions(self, ignore_targets=None) -> bool:
        """Whether no token is tracked by two categories (`ignore_targets` left out)."""
        ignored = {ignore_targets} if isinstance(ignore_targets, str) else set(ignore_targets or ())
        tokens = [t for category, ts in self.target_tokens.items() if category not in ignored for t in ts]
        return len(tokens) == len(set(tokens))

    def get_target_probs(self, probs: torch.Tensor, layer: int | None = None) -> dict[str, torch.Tensor]:
        """Each category's probability from `probs` `[batch, layers, vocab]` (at `layer` when given)."""
        result = {category: probs[:, :, tokens].sum(-1).cpu() for category, tokens in self.target_tokens.items()}
        return result if layer is None else {category: p[:, layer] for category, p in result.items()}

    def run(self, model, get_probs: Callable) -> dict[str, torch.Tensor]:
        """get_probs(model, prompt) -> `[1, layers, vocab]`; returns each category's probabilities."""
        return self.get_target_probs(get_probs(model, self.prompt))


def next_token_probs_unsqueeze(model, prompts, remote: bool = False, **_) -> torch.Tensor:
    """`compute_next_token_probs` with a layer axis of 1: `[num_prompts, 1, vocab]`."""
    return compute_next_token_probs(model, prompts, remote=remote).unsqueeze(1)


@torch.no_grad()
def run_prompts(
    model, prompts: list[Prompt], batch_size: int = 32, get_probs_func: Callable | None = None,
    func_kwargs: dict | None = None, remote: bool = False, tqdm=auto_tqdm,
) -> dict[str, torch.Tensor]:
    """Each category's probability for every prompt: `{category: [num_prompts, layers]}` on the CPU.

    get_probs_func(model, prompts, **func_kwargs) -> `[batch, layers, vocab]`; default the next-token
    distribution (one layer); `logit_lens` gives one row per layer. All prompts must track the same
    categories.
    """
    if not prompts:
        return {}
    for prompt in prompts:
        if not isinstance(prompt, Prompt):
            raise TypeError(
                f"run_prompts takes Prompt objects, which say which tokens to track, not {type(prompt).__name__}: "
                "build them with Prompt.from_strings(text, {category: target words}, model.tokenizer), or call "
                "the probability function on plain prompts yourself (logit_lens(model, prompts))"
            )
    categories = list(prompts[0].target_tokens)
    for prompt in prompts:
        if list(prompt.target_tokens) != categories:
            raise ValueError(f"every prompt must track the same categories: {categories} vs {list(prompt.target_tokens)}")
    get_probs = get_probs_func or next_token_probs_unsqueeze
    starts = progress(model, range(0, len(prompts), batch_size), tqdm, "running prompts", "batch")
    kwargs = dict(func_kwargs or {}, **({"remote": True} if remote else {}))
    probs = torch.cat([get_probs(model, [p.prompt for p in prompts[s : s + batch_size]], **kwargs) for s in starts])
    return {
        category: kept(torch.stack([probs[i, :, prompt.target_tokens[category]].sum(-1)
                                    for i, prompt in enumerate(prompts)]).cpu())
        for category in categories
    }
