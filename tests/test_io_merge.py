"""Checkpoint I/O and the file merge: safe loading, clear errors before work, atomic output, HF round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from searchmerge.cli import main
from searchmerge.errors import CheckpointError, OutputError
from searchmerge.io.checkpoint import CheckpointReader
from searchmerge.io.writer import write_safetensors_folder
from searchmerge.merge import merge
from searchmerge.recipe import Recipe
from tests.helpers import make_gpt2_zoo, perturbed, tiny_state


@pytest.fixture(scope="module")
def gpt2_zoo(tmp_path_factory):
    return make_gpt2_zoo(tmp_path_factory.mktemp("zoo"), n_models=3)


def _recipe(base, fts, method="ties", **params):
    return Recipe(method=method, base_model=str(base), models=[{"model": str(d)} for d in fts], parameters=params)


def test_merged_folder_loads_with_transformers_and_matches_in_memory(gpt2_zoo, tmp_path):
    from transformers import AutoModelForCausalLM

    base, fts = gpt2_zoo
    recipe = _recipe(base, fts, density=0.3, trim_scope="model", merge_func="sum", **{"lambda": 0.3})
    out = merge(recipe, out=tmp_path / "merged")
    assert (out / "config.json").is_file() and (out / "searchmerge_recipe.yaml").is_file()
    state = merge(recipe)
    model = AutoModelForCausalLM.from_pretrained(out)
    ref = AutoModelForCausalLM.from_pretrained(base)
    ref.load_state_dict(state, strict=False)
    ids = torch.arange(12).unsqueeze(0)
    assert torch.allclose(model(ids).logits, ref(ids).logits, atol=1e-6)
    assert Recipe.from_yaml((out / "searchmerge_recipe.yaml").read_text()) == recipe


def test_existing_output_is_refused_then_replaced_atomically(gpt2_zoo, tmp_path):
    base, fts = gpt2_zoo
    out = tmp_path / "m"
    merge(_recipe(base, fts, "task_arithmetic"), out=out)
    with pytest.raises(OutputError, match="already exists"):
        merge(_recipe(base, fts, "task_arithmetic"), out=out)
    merge(_recipe(base, fts, "task_arithmetic", **{"lambda": 0.5}), out=out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary folders left


def test_interrupted_write_leaves_no_output(tmp_path, monkeypatch):
    import searchmerge.io.writer as writer

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(writer, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        write_safetensors_folder({"w": torch.zeros(2)}, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_sharded_output_is_read_back(tmp_path):
    sd = {f"layers.{i}.w": torch.randn(64, 64) for i in range(4)}
    out = write_safetensors_folder(sd, tmp_path / "sharded", max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    reader = CheckpointReader(out)
    assert all(torch.equal(reader.get(k), v) for k, v in sd.items())


def test_pickle_checkpoints_are_refused_unless_allowed(tmp_path):
    sd = tiny_state()
    torch.save(sd, tmp_path / "model.bin")
    with pytest.raises(CheckpointError, match="pickle"):
        CheckpointReader(tmp_path / "model.bin")
    reader = CheckpointReader(tmp_path / "model.bin", allow_pickle=True)
    assert torch.equal(reader.get("layers.0.w"), sd["layers.0.w"])
    folder = tmp_path / "hf"
    folder.mkdir()
    torch.save(sd, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="allow_pickle"):
        CheckpointReader(folder)


def _save(tmp_path: Path, name: str, sd: dict) -> Path:
    f = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(f))
    return f


def test_errors_before_any_work(tmp_path):
    base = tiny_state()
    b = _save(tmp_path, "base", base)
    good = _save(tmp_path, "good", perturbed(base, 0.1, 1))
    missing = _save(tmp_path, "missing", {k: v for k, v in base.items() if k != "layers.1.w"})
    shaped = _save(tmp_path, "shaped", {**base, "layers.2.w": torch.zeros(6, 7)})
    inty = _save(tmp_path, "inty", {**base, "layers.0.b": torch.zeros(6, dtype=torch.int64)})
    cases = [
        (missing, r"missing tensor\(s\) \['layers.1.w'\]"),
        (shaped, r"shape mismatch for tensor layers.2.w: base model has \[6, 6\], models\[1\]"),
        (inty, "cannot be merged with an integer"),
        (tmp_path / "nope.safetensors", "checkpoint not found"),
    ]
    for bad, match in cases:
        recipe = Recipe(method="task_arithmetic", base_model=str(b), models=[{"model": str(good)}, {"model": str(bad)}])
        with pytest.raises(CheckpointError, match=match):
            merge(recipe, out=tmp_path / "never")
        assert not (tmp_path / "never").exists()


def test_bare_safetensors_and_out_dtype(tmp_path):
    base = tiny_state()
    b = _save(tmp_path, "base", base)
    m = _save(tmp_path, "m", perturbed(base, 0.1, 1))
    out = merge(Recipe(method="task_arithmetic", base_model=str(b), models=[{"model": str(m)}]), out_dtype="bfloat16")
    assert out["layers.0.w"].dtype == torch.bfloat16 and out["position_ids"].dtype == torch.int64


def test_cli_merge_methods_convert(gpt2_zoo, tmp_path, capsys):
    base, fts = gpt2_zoo
    recipe = _recipe(base, fts, "ties", density=0.5, weight=0.4)
    f = tmp_path / "r.yaml"
    f.write_text(recipe.to_yaml())
    assert main(["merge", str(f), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert main(["merge", str(f), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["convert", str(f), "--out", str(tmp_path / "mk.yaml")]) == 0
    assert "merge_method: ties" in (tmp_path / "mk.yaml").read_text()
    # the MergeKit config merges to the same tensors as our recipe
    assert main(["merge", str(tmp_path / "mk.yaml"), "--out", str(tmp_path / "out2"), "--quiet"]) == 0
    a, b = CheckpointReader(tmp_path / "out"), CheckpointReader(tmp_path / "out2")
    assert all(torch.equal(a.get(k), b.get(k)) for k in a.keys())
    capsys.readouterr()
    assert main(["methods"]) == 0
    listing = capsys.readouterr().out
    assert "dare_ties" in listing and "density" in listing


def test_demo_quick(tmp_path):
    from searchmerge.demo import run_demo

    rows = run_demo(tmp_path, quick=True)
    assert {r["recipe"] for r in rows} >= {"task_arithmetic", "ties_fusionbench"}
    assert (tmp_path / "demo.md").is_file()


def test_package_level_merge_is_the_function(tmp_path):
    import searchmerge
    import searchmerge.merge  # noqa: F401  (importing the submodule must not shadow the function)

    base = tiny_state()
    recipe = searchmerge.Recipe(method="task_arithmetic", base_model="b", models=[{"model": "m"}])
    out = searchmerge.merge(recipe, base=base, models=[perturbed(base, 0.1, 1)])
    assert set(out) == set(base)
