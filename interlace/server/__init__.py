"""The interlace server: hosts a model and runs stranger's intervention graphs on it, as data.

`interlace serve MODEL` builds a `Service` (the hosted model, its job queue and worker, the key
store, limits, metrics), wraps it in the FastAPI app (`app.py`, routes in `routes/`) and serves it
with uvicorn. DESIGN.md section 6 describes the endpoints; README.md ("Remote") how to run it.
"""

from __future__ import annotations

import logging

from .app import Service, create_app
from .hosting import HostedModel, load_model
from .keys import KeyStore
from .settings import ServerSettings

__all__ = ["HostedModel", "KeyStore", "ServerSettings", "Service", "create_app", "load_model", "serve"]


def serve(model: str, *, name: str | None, db: str, host: str, port: int, settings: ServerSettings) -> None:
    """Load `model`, then serve it under `name` until interrupted."""
    import uvicorn

    log = logging.getLogger("interlace.server")
    if settings.trusted:
        log.warning("--trusted: this server runs the pickled Python functions of anyone holding a key. "
                    "Use it only when every key holder may run code on this machine.")
    hosted = HostedModel(load_model(model), name or _model_id(model), settings)
    app = create_app(Service({hosted.id: hosted}, KeyStore(db), settings))
    uvicorn.run(app, host=host, port=port, log_level="warning")


def _model_id(model: str) -> str:
    import os

    return os.path.basename(os.path.normpath(model)).removesuffix(".gguf")
