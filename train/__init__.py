"""
otter.train: instruction-tuning and interleaved pretraining data, collation and label masking, and the accelerate
training loop. `otter train finetune|pretrain` drives it; `otter.train.trainer.train(TrainingConfig(...))` from
Python. Modules: `data` (records of each format -> examples), `collate` (examples -> labelled, padded batches),
`loaders` (example order per process, epochs, resume positions), `trainer` (the loop, checkpoints, output).
See train/README.md.
"""
