"""Plain-Python core of photoset. Nothing in this package imports Dagster."""
