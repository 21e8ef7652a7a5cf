"""Peer servers for `python -m benchmarks.service_bench --peers`: LitServe, a plain FastAPI endpoint and an HTTP ceiling."""
