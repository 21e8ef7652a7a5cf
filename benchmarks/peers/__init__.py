"""Peer servers for `puppet-cnn bench --peers`: LitServe, a plain FastAPI endpoint and an HTTP ceiling."""
