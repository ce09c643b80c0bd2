"""``image_task``: HF image-classification folders evaluate exactly as plain transformers; heads never merged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from searchmerge.bench.evaluate import evaluate
from searchmerge.bench.pool import BenchSpecError, load_bench
from searchmerge.bench.zoo.common import write_parquet
from searchmerge.merge import merge
from searchmerge.recipe import Recipe

TASKS = [("a", 3), ("b", 2)]
SIDE = 20  # stored images are 20 x 20; the processor resizes to 16


def _config(arch: str, n: int):  # noqa: ANN202
    import transformers

    if arch == "vit":
        return transformers.ViTConfig(image_size=16, patch_size=4, hidden_size=16, num_hidden_layers=2,
                                      num_attention_heads=2, intermediate_size=32, num_labels=n)
    # ResNet: BatchNorm running statistics (and int64 counters) in the backbone, a Sequential head
    return transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                                     num_labels=n)


def _processor(arch: str):  # noqa: ANN202
    from transformers import ConvNextImageProcessor, ViTImageProcessor

    if arch == "vit":
        return ViTImageProcessor(size={"height": 16, "width": 16})
    return ConvNextImageProcessor(size={"shortest_edge": 16}, crop_pct=0.875)  # ResNet's processor class


def _images(rng: np.random.Generator, n_classes: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 H x W x 3 images whose label channel is a little brighter (a few steps learn it, not perfectly)."""
    y = rng.integers(0, n_classes, k)
    x = rng.integers(0, 216, (k, SIDE, SIDE, 3))
    x[np.arange(k), :, :, y] += 12  # a weak signal: accuracies stay away from 1
    return x.astype(np.uint8), y


def _pixels(arch: str, images: np.ndarray, processor: bool) -> torch.Tensor:
    if processor:
        return _processor(arch)(list(images), return_tensors="pt")["pixel_values"]
    from searchmerge.bench.families.pixels import images_to_tensor

    return images_to_tensor(list(images), 16 if arch == "vit" else 224)  # the documented defaults


def _pool(root: Path, arch: str, processor: bool = True, steps: int = 4) -> tuple[Path, dict[str, torch.nn.Module]]:
    """A base + one fine-tuned ``…ForImageClassification`` folder per task (all parameters, a few AdamW steps)."""
    from transformers import AutoModel, AutoModelForImageClassification

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    base_cfg = _config(arch, 2)
    base = AutoModel.from_config(base_cfg, add_pooling_layer=False) if arch == "vit" else AutoModel.from_config(base_cfg)
    base.save_pretrained(root / "base")
    if processor:
        _processor(arch).save_pretrained(root / "base")
    tasks, ft = [], {}
    for t, n in TASKS:
        data = {s: _images(rng, n, 48) for s in ("train", "test")}
        for s, (x, y) in data.items():
            write_parquet(root / t / f"{s}.parquet", {"image": x.tolist(), "label": y})
        m = AutoModelForImageClassification.from_pretrained(str(root / "base"), config=_config(arch, n))
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        m.train()
        px, labels = _pixels(arch, data["train"][0], processor), torch.as_tensor(data["train"][1])
        for _ in range(steps):
            opt.zero_grad()
            m(pixel_values=px, labels=labels).loss.backward()
            opt.step()
        m.eval().save_pretrained(root / f"ft_{t}")
        if processor:
            _processor(arch).save_pretrained(root / f"ft_{t}")
        ft[t] = m
        tasks.append({"name": t, "input_column": "image", "train": f"{t}/train.parquet", "test": f"{t}/test.parquet"})
    spec = {"modelpool": {"family": "image_task", "base": "base", "finetuned": {t: f"ft_{t}" for t in ft}},
            "taskpool": {"tasks": tasks}}
    (root / "bench.yaml").write_text(yaml.safe_dump(spec))
    return root / "bench.yaml", ft


def _plain_accuracy(m: torch.nn.Module, arch: str, bench, t: str, processor: bool) -> float:  # noqa: ANN001
    s = bench.taskpool.tasks[t].splits["test"]
    with torch.no_grad():
        pred = m(pixel_values=_pixels(arch, np.asarray(s.inputs, dtype=np.uint8), processor)).logits.argmax(-1).numpy()
    return float((pred == s.labels).mean())


@pytest.mark.parametrize("arch, processor", [("vit", True), ("resnet", True), ("vit", False)])
def test_individual_equals_plain_transformers(tmp_path: Path, arch: str, processor: bool) -> None:
    path, ft = _pool(tmp_path, arch, processor)
    bench = load_bench(path)
    mp = bench.modelpool
    for t, n in TASKS:
        m = ft[t]
        prefix = f"{m.base_model_prefix}."
        assert set(mp.base) == {k[len(prefix):] for k in m.state_dict() if k.startswith(prefix)}
        assert set(mp.heads[t]) == {k for k in m.state_dict() if not k.startswith(prefix)}  # its own head only
        assert bench.taskpool.tasks[t].num_classes == n  # label count from its own folder
        r = evaluate(mp.model(mp.finetuned[t]), bench.taskpool.subset([t]), "test")
        assert r["per_task"][t] == pytest.approx(_plain_accuracy(m, arch, bench, t, processor), abs=0)
    assert set(mp.model().runner().module.state_dict()) == set(mp.base)


def _backbone(folder: Path, prefix: str) -> dict[str, torch.Tensor]:
    sd = load_file(str(folder / "model.safetensors"))
    return {k[len(prefix) + 1:]: v for k, v in sd.items() if k.startswith(f"{prefix}.")}


@pytest.mark.parametrize("arch, prefix", [("vit", "vit"), ("resnet", "resnet")])
def test_backbone_merge_equals_merge_of_stripped_backbones(tmp_path: Path, arch: str, prefix: str) -> None:
    path, ft = _pool(tmp_path, arch, steps=2)
    recipe = Recipe(method="task_arithmetic", base_model=str(tmp_path / "base"),
                    models=[{"model": str(tmp_path / f"ft_{t}")} for t, _ in TASKS], parameters={"lambda": 0.7})
    got = merge(recipe)
    base = load_file(str(tmp_path / "base" / "model.safetensors"))
    stripped = [_backbone(tmp_path / f"ft_{t}", prefix) for t, _ in TASKS]
    want = merge(Recipe(method="task_arithmetic", base_model="base", models=[{"model": "a"}, {"model": "b"}],
                        parameters={"lambda": 0.7}), base=base, models=stripped)
    assert set(got) == set(want) == set(base)  # every head tensor (classifier.*) left out
    for k in want:
        assert torch.equal(got[k], want[k]), k
    # the bench: the same merge of the pool's backbones, under each task's own, unmerged head
    bench = load_bench(path)
    mp = bench.modelpool
    merged = _pool_merge(mp, 0.7)
    runner = mp.model(merged).runner()
    for t, _ in TASKS:
        own = load_file(str(tmp_path / f"ft_{t}" / "model.safetensors"))
        task_sd = runner.module._tasks[t].state_dict()
        for k, v in mp.heads[t].items():
            assert torch.equal(v, own[k]) and torch.equal(task_sd[k], own[k]), k
        for k, v in merged.items():
            assert torch.equal(task_sd[f"{prefix}.{k}"], v), k
    assert evaluate(mp.model(merged), bench.taskpool, "test")["n"] == 2 * 48


def _pool_merge(mp, lam: float) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """Task arithmetic on the pool's in-memory backbones (transformers' own tensor names)."""
    return merge(Recipe(method="task_arithmetic", base_model="base", models=[{"model": t} for t, _ in TASKS],
                        parameters={"lambda": lam}), base=mp.base, models=[mp.finetuned[t] for t, _ in TASKS])


def test_per_task_folders_load_as_image_classifiers(tmp_path: Path) -> None:
    """``--heads per_task`` folders, loaded by transformers, hold the bench's merge and their own heads.

    ViT's file names (``encoder.layer.0.attention.attention.query``) differ from its module names in
    transformers 5 (``layers.0.attention.q_proj``): the folders are merged in file names, the pool in
    module names, and transformers' own loading maps one onto the other.
    """
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    path, _ = _pool(tmp_path, "vit", steps=1)
    recipe = Recipe(method="task_arithmetic", base_model=str(tmp_path / "base"),
                    models=[{"model": str(tmp_path / f"ft_{t}")} for t, _ in TASKS], parameters={"lambda": 0.5})
    out = merge(recipe, out=tmp_path / "merged", heads="per_task")
    mp = load_bench(path).modelpool
    want = _pool_merge(mp, 0.5)
    for t, n in TASKS:
        m = AutoModelForImageClassification.from_pretrained(str(out / "tasks" / f"ft_{t}"))
        AutoImageProcessor.from_pretrained(str(out / "tasks" / f"ft_{t}"))  # its preprocessing travels with it
        sd = m.state_dict()
        assert m.config.num_labels == n
        assert set(sd) == {f"vit.{k}" for k in want} | set(mp.heads[t])
        for k, v in mp.heads[t].items():
            assert torch.equal(sd[k], v), k  # its own head, not merged
        for k, v in want.items():
            assert torch.equal(sd[f"vit.{k}"], v), k


def test_separate_heads_refused(tmp_path: Path) -> None:
    path, _ = _pool(tmp_path, "vit", steps=0)
    spec = yaml.safe_load(path.read_text())
    spec["modelpool"]["heads"] = {"a": "x.safetensors", "b": "y.safetensors"}
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(BenchSpecError, match="family `image_task` reads each task's head from its fine-tuned folder"):
        load_bench(path)
