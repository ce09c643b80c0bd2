"""Model pools and task pools (FusionBench's ``modelpool`` / ``taskpool``).

:mod:`.spec` — the pydantic specs and YAML in/out; :mod:`.tasks` — task data read and checked;
:mod:`.models` — model folders and heads loaded and checked; :mod:`.load` — a whole bench, every check
before any work. Every name stays importable from ``searchmerge.bench.pool``.
"""

from searchmerge.bench.pool.spec import (  # noqa: F401
    SPLITS, BenchSpec, BenchSpecError, ModelPoolSpec, TaskPoolSpec, TaskSpec, _pydantic_error, parse_bench_spec,
    read_bench_spec,
)
from searchmerge.bench.pool.tasks import (  # noqa: F401
    VAL_FRACTION, VAL_SEED, Split, TaskData, TaskPool, _load_split, carve_validation, load_task, load_taskpool,
    read_table,
)
from searchmerge.bench.pool.models import ModelPool, _load_task_model_pool, load_modelpool, num_labels  # noqa: F401
from searchmerge.bench.pool.load import (  # noqa: F401
    Bench, check_class_names, load_bench, write_json, zero_shot_cache_dir,
)
