"""The offline demo: a local photo server with generated images, and tiny random-weight models (tests use both)."""
