"""One router per resource: `health` (health, metrics), `models` (list, manifest), `jobs`."""
