"""Kept import path: ``seqcls_task`` lives in :mod:`searchmerge.bench.families.task`."""

from searchmerge.bench.families.task import (  # noqa: F401
    SeqClsTaskFamily, TaskModelRunner, load_task_model, split_task_model,
)
