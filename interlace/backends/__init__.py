"""Backends execute a recorded graph: `local` here, next to the model; `remote` on a server."""
