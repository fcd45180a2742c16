"""Model families (DINOv3, captioner, Flux VAE, T5): load by hub id or local path, run a batch, return arrays."""
