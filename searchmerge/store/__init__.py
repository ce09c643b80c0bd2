"""Resident task vectors on Ray actors: read checkpoints once, merge every search trial in memory.

    store = TaskVectorStore.build(base_dir, [ft1, ft2], num_actors=1)
    ev = store.attach_evaluator(functools.partial(AutoModelForCausalLM.from_pretrained, base_dir))
    for recipe in trials:
        store.merge_into(recipe, ev)          # in place, no disk, no re-instantiation
        score = ev.run(evaluate_fn)
"""

from searchmerge.store.store import ResidentEvaluator, StoreActorDied, StoreError, TaskVectorStore

__all__ = ["TaskVectorStore", "ResidentEvaluator", "StoreError", "StoreActorDied"]
