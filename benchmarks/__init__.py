"""Benchmarks that need more than the service: peer servers, installed only in .venv-bench."""
