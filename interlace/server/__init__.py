"""The server: `interlace serve` hosts a model, and clients run their traces on it with `remote=True`.

app.py (the service, the app factory, running it with a drain on SIGTERM), config.py (its settings),
hosting.py (a hosted model: admit and execute requests, its manifest), jobs.py (jobs, the queue and its
batches, the worker threads), store.py (the jobs by id, kept in SQLite beside the keys), keys.py (API keys in SQLite), auth.py (key and quota dependencies), errors.py (error -> status),
metrics.py (Prometheus), schemas.py (JSON bodies), routers/ (health, models, jobs), cluster.py (the
same app on Ray Serve, its model replicas run batches; needs the `ray` extra).
The service imports the executor (models, backends); nothing there imports the service.
"""
