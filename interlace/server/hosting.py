"""HostedModel: a model the server holds, the checks a request passes before it is queued, and the run.

The server interprets data and never runs user code: a request is loaded within the server's
limits, checked against the model (module paths, parameter names, invokes, options) before it is
queued, and run untrusted (`Model.run(untrusted=True)`): allowed operations only, weights read-only,
every budget checked. The manifest lets a client build the model's module tree and its tokenizer
without weights or a model hub.
"""

from __future__ import annotations

import hashlib
import os

import torch

from ..backends.serialize import VERSION, deserialize_request, serialize_results
from ..backends.validate import check_against_model
from ..errors import LimitError
from ..graph import Request
from ..models.base import Model
from ..models.language import DEFAULT_MODEL, LanguageModel
from .settings import ServerSettings


def load_model(name: str) -> LanguageModel:
    """`smollm2`, a local model folder, a GGUF file or a cached model id, with its weights loaded."""
    if name == DEFAULT_MODEL:
        return LanguageModel.default(dispatch=True)
    if os.path.isfile(name) and name.endswith(".gguf"):
        return LanguageModel(os.path.dirname(os.path.abspath(name)), gguf_file=os.path.basename(name), dispatch=True)
    return LanguageModel(name, dispatch=True)


class HostedModel:
    """One model the server runs jobs on, under `model_id`."""

    def __init__(self, model: Model, model_id: str, settings: ServerSettings):
        self.model, self.id, self.settings = model, model_id, settings
        self.module = model._module.eval()
        self.checksum = weights_checksum(self.module) if settings.check_weights else None

    # -- before queueing ---------------------------------------------------------------------------
    def load(self, data: bytes) -> Request:
        """The request in `data`, loaded within the limits and checked against this model."""
        limits = self.settings.limits
        request = deserialize_request(data, trusted=self.settings.trusted, limits=limits)
        extra = self.model._extra_modules()
        for trace in request.traces:
            if len(trace.invokes) > self.settings.max_invokes:
                raise LimitError(f"a trace has {len(trace.invokes)} invokes, over the limit of "
                                 f"{self.settings.max_invokes} (max_invokes)")
            self.model.check_options(trace.options, limits)
            check_against_model(request.graph, self.module, extra, len(trace.invokes), trace.start, trace.end)
        return request

    # -- in the worker -----------------------------------------------------------------------------
    def run(self, request: Request, cancel=None) -> bytes:
        """Run the request and return the bytes of its results; the model is left exactly as it was."""
        limits = self.settings.limits
        outcome = self.model.run(request, untrusted=not self.settings.trusted, limits=limits, cancel=cancel)
        data = serialize_results(outcome.results, outcome.logs, outcome.missing, graph=request.graph, limits=limits)
        if self.checksum is not None and weights_checksum(self.module) != self.checksum:
            raise RuntimeError(f"the weights of {self.id} changed during a job")  # never expected: a server bug
        return data

    # -- what clients see ----------------------------------------------------------------------------
    def describe(self) -> dict:
        parameters = sum(p.numel() for p in self.module.parameters())
        first = next(self.module.parameters(), None)
        return {"id": self.id, "class": type(self.module).__name__, "parameters": parameters,
                "dtype": str(first.dtype).removeprefix("torch.") if first is not None else None,
                "device": str(first.device) if first is not None else None}

    def manifest(self) -> dict:
        """What a client needs to build this model's envoys and tokenizer: no weights."""
        config = getattr(self.module, "config", None)
        tokenizer = getattr(self.model, "tokenizer", None)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        return {
            **self.describe(),
            "wire_version": VERSION,
            "config": config.to_dict() if config is not None else None,
            "modules": [[path, type(module).__name__] for path, module in self.module.named_modules()],
            "tokenizer": None if backend is None else {
                "json": backend.to_str(),
                "special": {name: str(value) for name, value in tokenizer.special_tokens_map.items()
                            if isinstance(value, str)},
            },
        }


def weights_checksum(module: torch.nn.Module) -> str:
    """A digest of every parameter and buffer, bit for bit (the test mode of `--check-weights`)."""
    digest = hashlib.sha256()
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        digest.update(name.encode())
        data = tensor.detach().contiguous().cpu()
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()
