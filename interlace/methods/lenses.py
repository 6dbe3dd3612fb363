"""The classic lenses and interventions: logit lens, patchscopes, the object-attention lens, steering.

Each opens its own traces on a `StandardizedTransformer` and returns CPU tensors, with nnterp's
names, arguments and numbers. Where nnterp is wrong this is right, and says so:
`project_on_vocab` applies the family's final-logit transform (Gemma 2 soft-capping, Cohere's
`logit_scale`, Granite's `logits_scaling`), and a positive `index_to_patch` counts from each
prompt's first token rather than from the padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm as auto_tqdm

from .activations import get_token_activations
from .getters import check_prompt_lengths, kept, progress, standardized


@torch.no_grad()
def logit_lens(model, prompts, remote: bool = False) -> torch.Tensor:
    """Each layer's next-token distribution at the last position, in one forward.

    Returns `[num_prompts, num_layers, vocab]` probabilities on the CPU: `project_on_vocab` of every
    layer's output (no embedding row), then softmax (in float32, whatever the model's dtype). The last
    layer's row is `next_token_probs`. All prompts go in one forward and the result is
    `num_layers x vocab` floats a prompt: call it on batches of many prompts (`run_prompts(...,
    get_probs_func=logit_lens, batch_size=...)` does, with a progress bar, for the tokens it tracks).
    """
    model = standardized(model)
    with model.trace(prompts, remote=remote):
        hidden = torch.stack([model.layers_output[layer][:, -1] for layer in range(model.num_layers)], dim=1)
        probs = model.project_on_vocab(hidden).softmax(-1, dtype=torch.float32).cpu().save()
    return probs


@dataclass
class TargetPrompt:
    """A target prompt and the position in it that a patchscope overwrites.

    >>> TargetPrompt("cat -> cat; dog -> dog; ? ->", index_to_patch=-2).index_to_patch
    -2
    """

    prompt: str
    index_to_patch: int


def repeat_prompt(words=None, rel: str = " ", sep: str = "\n", placeholder: str = "?", index_to_patch: int = -1) -> TargetPrompt:
    """The patchscopes paper's next-token target: `"king king\\n1135 1135\\nhello hello\\n?"`, patched at `?`."""
    words = ["king", "1135", "hello"] if words is None else words
    return TargetPrompt(sep.join(w + rel + w for w in words) + sep + placeholder, index_to_patch)


def it_repeat_prompt(
    tokenizer, words=None, rel: str = " ", sep: str = "\n", placeholder: str = "?",
    complete_prompt: bool = True, add_user_instr: bool = True, use_system_prompt: bool = True,
) -> TargetPrompt:
    """`repeat_prompt` in the tokenizer's chat template, for instruction-tuned models; patched at the last token.

    complete_prompt: the assistant's answer starts with the prompt (else it is empty);
    add_user_instr: a user turn asks to guess the next word (else the system prompt does);
    use_system_prompt: include a system turn.
    """
    prompt = repeat_prompt(words, rel, sep, placeholder).prompt
    instruction = "Guess the next word of the sentence. Answer with that word only."
    answer = {"role": "assistant", "content": prompt if complete_prompt else ""}
    system = [{"role": "system", "content": "You are a helpful assistant."}] if use_system_prompt else []
    if add_user_instr:
        chat = system + [
            {"role": "user", "content": instruction},
            {"role": "assistant", "content": "Ok."},
            {"role": "user", "content": prompt},
            answer,
        ]
    elif use_system_prompt:
        chat = [{"role": "system", "content": instruction}, {"role": "user", "content": prompt}, answer]
    else:
        chat = [{"role": "user", "content": f"{instruction} {prompt}"}, answer]
    text = tokenizer.apply_chat_template(chat, tokenize=False, continue_final_message=True)
    return TargetPrompt(text, -1)


@dataclass
class TargetPromptBatch:
    """Several target prompts, each with its own position to patch.

    >>> batch = TargetPromptBatch.from_prompts(["a b ?", "c ?"], [-1, 0])
    >>> batch[1]
    TargetPrompt(prompt='c ?', index_to_patch=0)
    """

    prompts: list[str]
    index_to_patch: torch.Tensor

    @classmethod
    def from_target_prompts(cls, prompts: list[TargetPrompt]) -> "TargetPromptBatch":
        return cls([p.prompt for p in prompts], torch.tensor([int(p.index_to_patch) for p in prompts]))

    @classmethod
    def from_target_prompt(cls, prompt: TargetPrompt, batch_size: int) -> "TargetPromptBatch":
        return cls([prompt.prompt] * batch_size, torch.tensor([int(prompt.index_to_patch)] * batch_size))

    @classmethod
    def from_prompts(cls, prompts, index_to_patch) -> "TargetPromptBatch":
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if isinstance(index_to_patch, int):
            index_to_patch = [index_to_patch] * len(prompts)
        return cls(prompts, torch.as_tensor(index_to_patch))

    @staticmethod
    def auto(target, batch_size: int) -> "TargetPromptBatch":
        """A batch from a `TargetPrompt` (repeated `batch_size` times), a list of them, or a batch."""
        if isinstance(target, TargetPrompt):
            return TargetPromptBatch.from_target_prompt(target, batch_size)
        if isinstance(target, list):
            return TargetPromptBatch.from_target_prompts(target)
        if isinstance(target, TargetPromptBatch):
            return target
        raise TypeError(f"expected a TargetPrompt, a list of them or a TargetPromptBatch, got {type(target).__name__}")

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> TargetPrompt:
        return TargetPrompt(self.prompts[index], int(self.index_to_patch[index]))

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def _from_end(model, prompts: list[str], positions: torch.Tensor, name: str) -> torch.Tensor:
    """Positions counted from each prompt's end (left padding puts every prompt's end at -1); one outside its
    prompt (`name` is the argument that gave it) is refused, as it would write padding that nothing reads."""
    lengths = torch.tensor(check_prompt_lengths(model, prompts, positions.tolist(), name))
    return torch.where(positions < 0, positions, positions - lengths)


@torch.no_grad()
def patchscope_lens(
    model, source_prompts=None, target_patch_prompts=None, layers=None, latents=None, remote: bool = False,
    *, layer_to_patch=None, tqdm=auto_tqdm,
) -> torch.Tensor:
    """Write each source's last-token hidden state into its target prompt, layer by layer, and read the next token.

    For each layer (`layers`, or `layer_to_patch` for one; default all), one trace of the targets
    where that layer's output at each target's `index_to_patch` is the source's hidden state at the
    same layer. latents: `[len(layers), num_sources, hidden]` to patch instead of reading sources.
    Returns `[num_sources, len(layers), vocab]` probabilities on the CPU. tqdm: the progress bar over layers
    (None for none).
    """
    model = standardized(model)
    if layer_to_patch is not None and layers is not None:
        raise ValueError("give layer_to_patch or layers, not both")
    layers = [layer_to_patch] if layer_to_patch is not None else layers
    layers = list(range(model.num_layers)) if layers is None else ([layers] if isinstance(layers, int) else list(layers))
    if (source_prompts is None) == (latents is None):
        raise ValueError("give either source_prompts or latents")
    if latents is None:
        source_prompts = [source_prompts] if isinstance(source_prompts, str) else list(source_prompts)
    # (in a session the latents read here are a traced value: their sizes are known from the arguments)
    count = len(source_prompts) if source_prompts is not None else latents.shape[1]
    targets = TargetPromptBatch.auto(repeat_prompt() if target_patch_prompts is None else target_patch_prompts, count)
    if len(targets) != count:
        raise ValueError(f"{count} sources but {len(targets)} target prompts")
    rows, columns = torch.arange(count), _from_end(model, targets.prompts, targets.index_to_patch, "index_to_patch")
    if latents is None:
        latents = get_token_activations(model, source_prompts, layers=layers, remote=remote)
    probs = []
    for index, layer in progress(model, list(enumerate(layers)), tqdm, "patchscope", "layer"):
        with model.trace(targets.prompts, remote=remote):
            hidden = model.layers_output[layer]
            hidden[rows, columns] = latents[index].to(hidden)
            probs.append(model.next_token_probs.cpu().save())
    return kept(torch.stack(probs, dim=1))


@torch.no_grad()
def patchscope_generate(
    model, prompts, target_patch_prompt: TargetPrompt, max_length: int = 50, layers=None, remote: bool = False,
    *, tqdm=auto_tqdm,
) -> dict[int, torch.Tensor]:
    """`patchscope_lens` that generates: `{layer: token ids}` generated from the patched target, on the CPU.

    The patch applies to the target's own forward pass; `max_length` new tokens follow. tqdm: the progress bar
    over layers (None for none).
    """
    model = standardized(model)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    layers = list(range(model.num_layers)) if layers is None else list(layers)
    targets = [target_patch_prompt.prompt] * len(prompts)
    column = int(_from_end(model, targets[:1], torch.tensor([int(target_patch_prompt.index_to_patch)]),
                               "index_to_patch")[0])
    hiddens = get_token_activations(model, prompts, layers=layers, remote=remote)
    generations = {}
    for index, layer in progress(model, list(enumerate(layers)), tqdm, "patchscope generation", "layer"):
        hidden_states = hiddens[index]  # (by index: in a session `hiddens` is a traced value)
        with model.generate(targets, max_new_tokens=max_length, remote=remote):
            hidden = model.layers_output[layer]
            hidden[:, column] = hidden_states.to(hidden)
            generations[layer] = model.generator.output.cpu().save()
    return generations


@torch.no_grad()
def patch_object_attn_lens(
    model, source_prompts, target_prompts, attn_idx_patch: int, num_patches: int = 5, remote: bool = False,
    *, tqdm=auto_tqdm,
) -> torch.Tensor:
    """Make the attention read each source's last token in place of one target token, over a window of layers.

    For each layer `l`, one trace of the targets in which the attention input at position
    `attn_idx_patch` of layers `l` to `l + num_patches - 1` is the source's last-token attention input
    at the same layer. Returns `[num_targets, num_layers, vocab]` next-token probabilities on the CPU. tqdm: the
    progress bar over layers (None for none).
    """
    model = standardized(model)
    source_prompts = [source_prompts] if isinstance(source_prompts, str) else list(source_prompts)
    target_prompts = [target_prompts] if isinstance(target_prompts, str) else list(target_prompts)
    rows = torch.arange(len(target_prompts))
    columns = _from_end(model, target_prompts, torch.full((len(target_prompts),), attn_idx_patch), "attn_idx_patch")
    sources = get_token_activations(
        model, source_prompts, get_activations=lambda m, layer: m.attentions_input[layer], remote=remote
    )
    probs = []
    for layer in progress(model, range(model.num_layers), tqdm, "object-attention lens", "layer"):
        with model.trace(target_prompts, remote=remote):
            for patched in range(layer, min(model.num_layers, layer + num_patches)):
                hidden = model.attentions_input[patched]
                hidden[rows, columns] = sources[patched].to(hidden)
            probs.append(model.next_token_probs.cpu().save())
    return kept(torch.stack(probs, dim=1))


def steer(model, layers, steering_vector: torch.Tensor, factor: float = 1.0, positions=None) -> None:
    """Inside a trace: add `factor * steering_vector` to the output of `layers` (at `positions`, default all)."""
    standardized(model).steer(layers, steering_vector, factor=factor, token_positions=positions)
