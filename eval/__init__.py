"""otter.eval: few-shot benchmark datasets, official metrics, demo selection and the evaluator."""
