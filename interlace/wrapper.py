"""WrapperModule: a module that returns its input, a place in the module tree to hook a value."""

from __future__ import annotations

import torch


class WrapperModule(torch.nn.Module):
    """Returns what it is called with (one argument: that argument; several: them as a tuple).

    Attach one to a model (`net.layer.probe = WrapperModule()`) and call it in a module's forward,
    or on traced values with `hook=True`, to read and change a value there like any module's output.

    >>> import torch, interlace
    >>> probe = interlace.WrapperModule()
    >>> probe(torch.ones(2)).tolist(), probe(1, 2)
    ([1.0, 1.0], (1, 2))
    """

    def forward(self, *args):
        return args[0] if len(args) == 1 else args
