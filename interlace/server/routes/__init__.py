"""The HTTP resources of the server, one router each: health, models, jobs, metrics."""
