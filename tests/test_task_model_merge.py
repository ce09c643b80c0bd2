"""``searchmerge merge`` on Hugging Face task-model folders: backbones merged, heads never merged (FusionBench's
``merge_backbone``), left out or carried per task."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from searchmerge.cli import main
from searchmerge.merge import merge
from searchmerge.recipe import Recipe
from tests.bench.test_task_models import _pool


def _backbone(folder: Path, prefix: str) -> dict[str, torch.Tensor]:
    sd = load_file(str(folder / "model.safetensors"))
    return {k[len(prefix) + 1:]: v for k, v in sd.items() if k.startswith(f"{prefix}.")}


def _recipe(root: Path, base: str = "base") -> Recipe:
    return Recipe(method="task_arithmetic", base_model=str(root / base),
                  models=[{"model": str(root / "ft_a")}, {"model": str(root / "ft_b")}], parameters={"lambda": 0.7})


@pytest.mark.parametrize("arch, prefix", [("bert", "bert"), ("distilbert", "distilbert"), ("gpt2", "transformer")])
def test_backbone_merge_equals_merge_of_stripped_backbones(tmp_path: Path, arch: str, prefix: str) -> None:
    _pool(tmp_path, arch)
    got = merge(_recipe(tmp_path))
    base = load_file(str(tmp_path / "base" / "model.safetensors"))
    stripped = [_backbone(tmp_path / f"ft_{t}", prefix) for t in "ab"]
    want = merge(Recipe(method="task_arithmetic", base_model="base", models=[{"model": "a"}, {"model": "b"}],
                        parameters={"lambda": 0.7}), base=base, models=stripped)
    assert set(got) == set(want) == set(base)  # every head tensor (classifier.*, pre_classifier.*) left out
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_base_may_be_a_task_model_too(tmp_path: Path) -> None:
    _pool(tmp_path, "bert")
    got = merge(Recipe(method="task_arithmetic", base_model=str(tmp_path / "ft_a"),
                       models=[{"model": str(tmp_path / "ft_b")}], parameters={"lambda": 0.5}))
    a, b = _backbone(tmp_path / "ft_a", "bert"), _backbone(tmp_path / "ft_b", "bert")
    assert set(got) == set(a)
    for k in a:
        assert torch.equal(got[k], a[k] + 0.5 * (b[k] - a[k])), k


def test_heads_dropped_output_is_the_base_model(tmp_path: Path) -> None:
    from transformers import AutoModel

    _pool(tmp_path, "bert")
    out = merge(_recipe(tmp_path, base="ft_a"), out=tmp_path / "merged")
    model = AutoModel.from_pretrained(str(out))  # a BertModel folder, loads strictly
    assert type(model).__name__ == "BertModel"
    assert not (out / "tasks").exists()


def test_heads_per_task_folders_load_with_their_own_heads(tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    _pool(tmp_path, "bert")
    out = merge(_recipe(tmp_path), out=tmp_path / "merged", heads="per_task")
    merged = load_file(str(out / "model.safetensors"))
    for t, n in [("a", 3), ("b", 5)]:
        m = AutoModelForSequenceClassification.from_pretrained(str(out / "tasks" / f"ft_{t}"))
        orig = load_file(str(tmp_path / f"ft_{t}" / "model.safetensors"))
        sd = m.state_dict()
        assert m.config.num_labels == n
        assert torch.equal(sd["classifier.weight"], orig["classifier.weight"])  # its own head, not merged
        for k, v in merged.items():
            assert torch.equal(sd[f"bert.{k}"], v), k


def test_cli_says_what_happened_to_the_heads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _pool(tmp_path, "bert")
    rec = tmp_path / "r.yaml"
    rec.write_text(_recipe(tmp_path).to_yaml())
    assert main(["merge", str(rec), "--out", str(tmp_path / "m"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "backbone of 2 task model(s)" in out and "classifier" in out and "left out" in out
