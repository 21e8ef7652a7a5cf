"""Benchmarks: the service under load (service_bench), against peer servers (peer_bench; each peer in its own
.venv-peers/<name>), two revisions side by side (revision_ab), and a profile of where a request's time goes."""
