"""Support for the tests, imported as `support.*` (pytest puts tests/ on sys.path): a live server, load, faults,
crafted images, checkpoints with hand-built router catalogs."""
