"""Pools, spec validation, the fixture zoo and in-process evaluation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from searchmerge.bench import BenchSpecError, evaluate, iter_evaluate, load_bench
from searchmerge.bench.pool import carve_validation, parse_bench_spec, read_bench_spec, Split
from searchmerge.merge import merge
from searchmerge.recipe import Recipe


def _ta(bench, lam):
    mp = bench.modelpool
    names = list(mp.finetuned)
    r = Recipe(method="task_arithmetic", base_model="base", models=[{"model": n} for n in names],
               parameters={"lambda": lam})
    return mp.model(merge(r, base=mp.base, models=[mp.finetuned[n] for n in names]))


def test_fixture_zoo_shows_merging_effects(fixture_bench):
    mp, tp = fixture_bench.modelpool, fixture_bench.taskpool
    assert len(tp.names) == 5
    pre = evaluate(mp.model(), tp, "test")
    assert set(pre["per_task"]) == set(tp.names)
    assert pre["average"] == pytest.approx(np.mean(list(pre["per_task"].values())))
    ind = np.mean([evaluate(mp.model(mp.finetuned[t]), tp, "test", tasks=[t])["average"] for t in tp.names])
    curve = {lam: evaluate(_ta(fixture_bench, lam), tp, "test")["average"] for lam in (0.5, 1.0)}
    assert pre["average"] < curve[0.5] < ind
    assert curve[1.0] < curve[0.5] - 0.02  # coefficient-sensitive


def test_iter_evaluate_reports_chunks(fixture_bench):
    mp, tp = fixture_bench.modelpool, fixture_bench.taskpool
    parts = list(iter_evaluate(mp.model(), tp, "validation", batch_size=50))
    assert len(parts) > 5
    assert parts[0]["n"] == 50 and parts[0]["total"] == sum(len(t.splits["validation"]) for t in tp.tasks.values())
    assert parts[-1] == evaluate(mp.model(), tp, "validation")


def test_validation_is_carved_from_train(fixture_bench):
    task = fixture_bench.taskpool.tasks["parity"]
    n_tr, n_val = len(task.splits["train"]), len(task.splits["validation"])
    assert n_val == round((n_tr + n_val) * 0.1)
    s = Split(inputs=list(range(100)), labels=np.arange(100) % 3)
    a1, b1 = carve_validation(s)
    a2, b2 = carve_validation(s)
    assert b1.inputs == b2.inputs and len(b1) == 10 and not set(a1.inputs) & set(b1.inputs)


def test_zoo_cache_reused_and_rebuilt_on_change(tmp_path, monkeypatch):
    from searchmerge.bench.zoo import build_zoo, fixture

    p1 = build_zoo("fixture", tmp_path, progress=False)
    mtime = p1.stat().st_mtime_ns
    assert build_zoo("fixture", tmp_path, progress=False) == p1 and p1.stat().st_mtime_ns == mtime
    monkeypatch.setattr(fixture, "DEFINITION", {**fixture.DEFINITION, "ft_steps": 5})
    p2 = build_zoo("fixture", tmp_path, progress=False)
    assert p2 != p1 and p2.is_file()
    monkeypatch.setenv("SEARCHMERGE_CACHE", str(tmp_path / "env"))
    from searchmerge.bench.zoo import cache_root

    assert cache_root() == tmp_path / "env"


# --- bad specs: each fails before any work, naming the problem ---------------------------------------


def _spec_dict(zoo: Path) -> dict:
    data = yaml.safe_load(zoo.read_text())
    return data


def _load(zoo: Path, data: dict):
    return load_bench(parse_bench_spec(data, root=zoo.parent, where="test"))


def test_bad_missing_split_file(fixture_zoo):
    d = _spec_dict(fixture_zoo)
    d["taskpool"]["tasks"][1]["test"] = "data/nope/test.parquet"
    with pytest.raises(BenchSpecError, match=r"task `ge5` test split .*file not found"):
        _load(fixture_zoo, d)


def test_bad_missing_column(fixture_zoo):
    d = _spec_dict(fixture_zoo)
    d["taskpool"]["tasks"][0]["label_column"] = "target"
    with pytest.raises(BenchSpecError, match=r"missing column `target`"):
        _load(fixture_zoo, d)


def test_bad_label_out_of_range(fixture_zoo, tmp_path):
    import pyarrow.parquet as pq

    d = _spec_dict(fixture_zoo)
    t = pq.read_table(fixture_zoo.parent / "data/parity/test.parquet").to_pydict()
    t["label"][3] = 7
    import pyarrow as pa

    pq.write_table(pa.table(t), tmp_path / "bad.parquet")
    d["taskpool"]["tasks"][0]["test"] = str(tmp_path / "bad.parquet")
    with pytest.raises(BenchSpecError, match=r"label 7 at row 3 is out of range \[0, 1\]"):
        _load(fixture_zoo, d)


def test_bad_head_task_count(fixture_zoo):
    d = _spec_dict(fixture_zoo)
    d["taskpool"]["tasks"] = d["taskpool"]["tasks"][:4]
    d["modelpool"]["finetuned"].pop("loop")
    with pytest.raises(BenchSpecError, match=r"5 head\(s\) for 4 task\(s\).*heads without a task \['loop'\]"):
        _load(fixture_zoo, d)


def test_bad_model_folder(fixture_zoo, tmp_path):
    d = _spec_dict(fixture_zoo)
    broken = tmp_path / "broken"
    shutil.copytree(fixture_zoo.parent / "models/mod3", broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    d["modelpool"]["finetuned"]["mod3"] = str(broken)
    with pytest.raises(BenchSpecError, match=r"fine-tuned `mod3` model folder .*broken does not load"):
        _load(fixture_zoo, d)
    d["modelpool"]["finetuned"]["mod3"] = str(tmp_path / "missing")
    with pytest.raises(BenchSpecError, match=r"does not exist"):
        _load(fixture_zoo, d)


def test_bad_yaml_and_unknown_metric(fixture_zoo, tmp_path):
    with pytest.raises(BenchSpecError, match="not found"):
        read_bench_spec(tmp_path / "none.yaml")
    d = _spec_dict(fixture_zoo)
    d["modelpool"]["family"] = "resnet"
    with pytest.raises(BenchSpecError, match="modelpool.family"):
        _load(fixture_zoo, d)
    d = _spec_dict(fixture_zoo)
    d["taskpool"]["tasks"][0]["metric"] = "bleu"
    with pytest.raises(Exception, match="unknown metric `bleu`"):
        _load(fixture_zoo, d)


def test_csv_and_jsonl_splits(fixture_zoo, tmp_path):
    import pyarrow.parquet as pq

    d = _spec_dict(fixture_zoo)
    t = pq.read_table(fixture_zoo.parent / "data/parity/test.parquet").to_pydict()
    with open(tmp_path / "test.jsonl", "w") as f:
        for x, y in zip(t["features"], t["label"]):
            f.write(json.dumps({"features": x, "label": y}) + "\n")
    d["taskpool"]["tasks"][0]["test"] = str(tmp_path / "test.jsonl")
    d["taskpool"]["tasks"][0]["validation"] = str(tmp_path / "test.jsonl")
    b = _load(fixture_zoo, d)
    assert len(b.taskpool.tasks["parity"].splits["validation"]) == len(t["label"])
    ref = load_bench(fixture_zoo)
    assert evaluate(b.modelpool.model(), b.taskpool, "test", tasks=["parity"]) == evaluate(
        ref.modelpool.model(), ref.taskpool, "test", tasks=["parity"])
