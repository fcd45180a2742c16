"""Software-defined assets, in pipeline order: sync, per-image artefacts, dataset."""
