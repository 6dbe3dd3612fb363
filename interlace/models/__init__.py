"""Model wrappers: `Model` for any nn.Module, `LanguageModel` for Hugging Face causal LMs."""
