"""Puppet-CNN Serve: the HTTP service. Imports `model`; `model` never imports this package."""
