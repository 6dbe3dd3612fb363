"""The per-architecture table: where each decoder family keeps its standardized parts, as data.

One row per `config.model_type`. A row names module paths exactly as `named_modules()` spells
them (`embed_tokens`, `layers`, `ln_final`, `lm_head` from the root; `attention`, `mlp`, `router`
under each layer) and the family's final-logit transform, if any. Nothing here runs a model; what
a row claims is checked by value in the tests (`tests/models/test_standardized_families.py`) and by
`interlace check-model`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Family:
    """Where one family keeps each standardized part (dotted module paths).

    final_logits: `(kind, config attribute)` applied after `lm_head`, as the family's own forward
    does: `softcap` (`cap * tanh(logits / cap)`), `scale` (`logits * value`) or `divide`
    (`logits / value`); skipped when the config value is None.

    >>> FAMILIES["gpt2"].layers, FAMILIES["gpt2"].attention
    ('transformer.h', 'attn')
    >>> FAMILIES["gemma2"].final_logits
    ('softcap', 'final_logit_softcapping')
    """

    embed_tokens: str = "model.embed_tokens"
    layers: str = "model.layers"
    attention: str = "self_attn"  # under each layer
    mlp: str | None = "mlp"  # under each layer; None: the family has no MLP module
    ln_final: str = "model.norm"
    lm_head: str = "lm_head"
    router: str | None = None  # under each layer, on mixture-of-experts families
    final_logits: tuple[str, str] | None = None
    # parts whose output tensor the layer later changes in place (Falcon adds the attention into the
    # MLP's output): reads return a copy taken when the module returns; write them by assignment
    copy_on_read: tuple[str, ...] = ()
    # the attention or MLP module that adds the residual to what it returns (Bloom's both, MPT's MLP):
    # the path, under each layer, of its submodule computing the update alone, which `attentions_output` /
    # `mlps_output` read and assign, so that they are what joins the residual on every family
    attention_update: str | None = None
    mlp_update: str | None = None
    # families whose attention does not go through transformers' attention interface but passes its
    # probabilities through a module of its own (Bloom's and GPT-Neo's dropout): that module, under the attention
    probabilities: str | None = None

    def output_of(self, part: str) -> str | None:
        """The path, under each layer, of the module whose output is `part`'s ("attention" or "mlp") value: what
        joins the residual (its update submodule where the part's module adds the residual itself)."""
        if part == "attention":
            return self.attention_update or self.attention
        return self.mlp_update or self.mlp

    def final_transform(self, logits, config):
        """`logits` after the family's final-logit transform (what its forward applies after lm_head)."""
        value = getattr(config, self.final_logits[1], None) if self.final_logits else None
        if value is None:
            return logits
        kind = self.final_logits[0]
        if kind == "softcap":
            return (logits / value).tanh() * value
        return logits * value if kind == "scale" else logits / value


LLAMA = Family()
GPT2 = Family("transformer.wte", "transformer.h", "attn", "mlp", "transformer.ln_f")
BLOOM = Family("transformer.word_embeddings", "transformer.h", "self_attention", "mlp", "transformer.ln_f",
                attention_update="self_attention.dense", mlp_update="mlp.dense_4h_to_h",
                probabilities="attention_dropout")
FALCON = replace(BLOOM, copy_on_read=("mlps",), attention_update=None, mlp_update=None, probabilities=None)
SOFTCAP = replace(LLAMA, final_logits=("softcap", "final_logit_softcapping"))
COHERE = replace(LLAMA, final_logits=("scale", "logit_scale"))
GRANITE = replace(LLAMA, final_logits=("divide", "logits_scaling"))
GRANITE_MOE = replace(GRANITE, mlp="block_sparse_moe", router="block_sparse_moe.router")

FAMILIES: dict[str, Family] = {
    "apertus": LLAMA,
    "arcee": LLAMA,
    "biogpt": Family("biogpt.embed_tokens", "biogpt.layers", "self_attn", None, "biogpt.layer_norm", "output_projection"),
    "bitnet": LLAMA,
    "bloom": BLOOM,
    "codegen": GPT2,
    "cohere": COHERE,
    "cohere2": COHERE,
    "cohere2_moe": replace(COHERE, router="mlp.gate"),
    "ernie4_5": LLAMA,
    "exaone4": LLAMA,
    "falcon": FALCON,
    "gemma": LLAMA,
    "gemma2": SOFTCAP,
    "gemma3_text": SOFTCAP,
    "gemma4_text": SOFTCAP,
    "glm": LLAMA,
    "glm4": LLAMA,
    "gpt2": GPT2,
    "gpt_bigcode": GPT2,
    "gpt_neo": replace(GPT2, probabilities="attention.attn_dropout"),
    "gpt_neox": Family("gpt_neox.embed_in", "gpt_neox.layers", "attention", "mlp", "gpt_neox.final_layer_norm"),
    "gpt_oss": replace(LLAMA, router="mlp.router"),
    "gptj": GPT2,
    "granite": GRANITE,
    "granitemoe": GRANITE_MOE,
    "granitemoeshared": GRANITE_MOE,
    "helium": LLAMA,
    "hunyuan_v1_dense": LLAMA,
    "hyperclovax": replace(LLAMA, final_logits=("scale", "logits_scaling")),  # multiplies, unlike Granite
    "llama": LLAMA,
    "ministral": LLAMA,
    "mistral": LLAMA,
    "mixtral": replace(LLAMA, router="mlp.gate"),
    "mpt": Family("transformer.wte", "transformer.blocks", "attn", "ffn", "transformer.norm_f",
                  mlp_update="ffn.down_proj"),
    "nanochat": SOFTCAP,
    "nemotron": LLAMA,
    "olmo": LLAMA,
    "olmo2": LLAMA,
    "olmo3": LLAMA,
    "olmoe": replace(LLAMA, router="mlp.gate"),
    # OPT's (and BioGPT's, XGLM's) feed-forward, fc1 and fc2, sits on the layer itself: no MLP module
    "opt": Family("model.decoder.embed_tokens", "model.decoder.layers", "self_attn", None, "model.decoder.final_layer_norm"),
    "persimmon": replace(LLAMA, ln_final="model.final_layernorm"),
    "phi": replace(LLAMA, ln_final="model.final_layernorm"),
    "phi3": LLAMA,
    "phimoe": replace(LLAMA, router="mlp.router"),
    "qwen2": LLAMA,
    "qwen2_moe": replace(LLAMA, router="mlp.gate"),
    "qwen3": LLAMA,
    "qwen3_moe": replace(LLAMA, router="mlp.gate"),
    "seed_oss": LLAMA,
    "smollm3": LLAMA,
    "stablelm": LLAMA,
    "starcoder2": LLAMA,
    "vaultgemma": SOFTCAP,
    "xglm": Family("model.embed_tokens", "model.layers", "self_attn", None, "model.layer_norm"),
}

# Architectures the standardized interface cannot describe, and why.
OUT_OF_REACH: dict[str, str] = {
    **dict.fromkeys(
        ["mamba", "mamba2", "falcon_mamba", "rwkv", "xlstm"],
        "a state-space / recurrent model: it has no attention layers to standardize",
    ),
    **dict.fromkeys(
        ["jamba", "zamba", "zamba2", "bamba", "falcon_h1", "nemotron_h", "granitemoehybrid", "lfm2",
         "lfm2_moe", "qwen3_next", "kimi_linear", "olmo_hybrid"],
        "a hybrid of attention and state-space (or linear-attention) layers, whose layers differ in kind",
    ),
}

# Config attributes that hold each size, first match wins (the names differ between families).
CONFIG_KEYS: dict[str, tuple[str, ...]] = {
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "num_heads": ("num_attention_heads", "n_head", "n_heads", "num_heads"),
    "vocab_size": ("vocab_size", "n_vocab"),
}
