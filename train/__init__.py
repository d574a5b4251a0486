"""otter.train: instruction-tuning and interleaved pretraining data, collation and the accelerate training loop."""
