"""Tables of prompts for a look at a data set before running it (pandas)."""

from __future__ import annotations


def prompts_to_df(prompts, tokenizer=None):
    """One column per `Prompt` (as nnterp lays it out): rows `prompt`, `<category>_string` for each
    target category, and with a tokenizer `<category>_tokens`, the tracked tokens as raw tokens.
    """
    try:
        import pandas as pd
    except ImportError:
        raise ImportError("prompts_to_df needs pandas: pip install 'interlace[display]'") from None
    columns = {}
    for number, prompt in enumerate(prompts):
        column = columns[number] = {"prompt": prompt.prompt}
        for category, strings in (prompt.target_strings or {}).items():
            column[f"{category}_string"] = strings
        if tokenizer is not None:
            for category, tokens in prompt.target_tokens.items():
                column[f"{category}_tokens"] = tokenizer.convert_ids_to_tokens(tokens)
    return pd.DataFrame.from_dict(columns)
