"""Tables of prompts for a look at a data set before running it (pandas)."""

from __future__ import annotations


def prompts_to_df(prompts, tokenizer=None):
    """One row per `Prompt`: its text, and for each target category its words and tracked tokens.

    With a tokenizer the tokens are shown as text, else as ids.
    """
    try:
        import pandas as pd
    except ImportError:
        raise ImportError("prompts_to_df needs pandas: pip install 'interlace[display]'") from None
    rows = []
    for prompt in prompts:
        row = {"prompt": prompt.prompt}
        for category, tokens in prompt.target_tokens.items():
            if prompt.target_strings is not None:
                row[category] = prompt.target_strings[category]
            row[f"{category}_tokens"] = [tokenizer.decode([t]) for t in tokens] if tokenizer is not None else list(tokens)
        rows.append(row)
    return pd.DataFrame(rows)
