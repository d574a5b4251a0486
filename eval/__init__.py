"""otter.eval: few-shot benchmark datasets, official metrics, demo selection and the evaluator."""

from .datasets import Benchmark, Example
from .evaluator import Evaluation, build_prompt, encode_batch, evaluate, markdown_summary, rank_classes
from .tasks import TASKS, Task, get_task

__all__ = ["evaluate", "Evaluation", "TASKS", "Task", "get_task", "Benchmark", "Example", "build_prompt",
           "encode_batch", "rank_classes", "markdown_summary"]
