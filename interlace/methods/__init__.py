"""The classic interpretability methods on a `StandardizedTransformer`, under nnterp's names.

Porting nnterp code: `from nnterp.interventions import ...`, `from nnterp.nnsight_utils import ...`,
`from nnterp.rename_utils import ...` and `from nnterp.prompt_utils import ...` all become
`from interlace.methods import ...`; `nnterp.display` becomes `interlace.display`.

>>> import transformers, interlace
>>> from interlace.methods import logit_lens
>>> config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=16, intermediate_size=32,
...                                   num_attention_heads=2, vocab_size=50)
>>> model = interlace.StandardizedTransformer(transformers.LlamaForCausalLM(config))
>>> tuple(logit_lens(model, [[1, 2, 3], [4, 5]]).shape)
(2, 2, 50)
"""

from ..models.standardized import RenameConfig, get_ignores, get_rename_dict, get_vocab_size, rename_table
from .activations import (
    collect_last_token_activations_session,
    collect_token_activations_batched,
    get_token_activations,
)
from .getters import (
    ModuleAccessor,
    compute_next_token_probs,
    get_attention,
    get_attention_output,
    get_embed_tokens,
    get_layer,
    get_layer_input,
    get_layer_output,
    get_layers,
    get_logits,
    get_mlp,
    get_mlp_output,
    get_next_token_probs,
    get_num_layers,
    get_unembed,
    get_unembed_norm,
    project_on_vocab,
    set_layer_output,
)
from .lenses import (
    TargetPrompt,
    TargetPromptBatch,
    it_repeat_prompt,
    logit_lens,
    patch_object_attn_lens,
    patchscope_generate,
    patchscope_lens,
    repeat_prompt,
    steer,
)
from .prompts import Prompt, get_first_tokens, next_token_probs_unsqueeze, run_prompts

__all__ = [
    "ModuleAccessor",
    "Prompt",
    "RenameConfig",
    "TargetPrompt",
    "TargetPromptBatch",
    "collect_last_token_activations_session",
    "collect_token_activations_batched",
    "compute_next_token_probs",
    "get_attention",
    "get_attention_output",
    "get_embed_tokens",
    "get_first_tokens",
    "get_ignores",
    "get_layer",
    "get_layer_input",
    "get_layer_output",
    "get_layers",
    "get_logits",
    "get_mlp",
    "get_mlp_output",
    "get_next_token_probs",
    "get_num_layers",
    "get_rename_dict",
    "get_token_activations",
    "get_unembed",
    "get_unembed_norm",
    "get_vocab_size",
    "it_repeat_prompt",
    "logit_lens",
    "next_token_probs_unsqueeze",
    "patch_object_attn_lens",
    "patchscope_generate",
    "patchscope_lens",
    "project_on_vocab",
    "rename_table",
    "repeat_prompt",
    "run_prompts",
    "set_layer_output",
    "steer",
]
