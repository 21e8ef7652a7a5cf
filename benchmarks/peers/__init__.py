"""Peer servers for `python -m benchmarks.peer_bench`: Triton (PyTriton), Ray Serve, BentoML, KServe, LitServe, a plain
FastAPI endpoint and an HTTP ceiling, all serving the shipped model through `common.Engine`."""
