"""Pictures of the methods' results (optional: `pip install 'interlace[display]'`, plotly and pandas).

>>> import torch
>>> from interlace.display import plot_topk_tokens
>>> fig = plot_topk_tokens(torch.tensor([[0.1, 0.7, 0.2]]), tokenizer=None, k=2)
>>> fig.data[0].text  # layer 0: the ids of the two likeliest tokens
(['1', '2'],)
"""

from .plots import plot_logit_lens, plot_topk_tokens
from .tables import prompts_to_df

__all__ = ["plot_logit_lens", "plot_topk_tokens", "prompts_to_df"]
