"""otter.conversion: OpenFlamingo checkpoints, open_clip towers and mosaic_gpt LMs to Otter / transformers folders."""
