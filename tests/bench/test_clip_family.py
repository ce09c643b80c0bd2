"""The `clip` family on a TINY CLIPModel made here (nothing downloaded): vision tower merged, zero-shot heads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from searchmerge.bench import evaluate, iter_evaluate, load_bench
from searchmerge.bench.pool import BenchSpecError, parse_bench_spec

WORDS = "a photo of the cat dog car tree ship bird plane red blue . , small big".split()
CLASSES = {"animals": ["cat", "dog", "bird"], "vehicles": ["car", "ship"]}
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _parquet(path: Path, rows: list[dict]) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<|startoftext|>", "<|endoftext|>", "[UNK]"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>", unk_token="[UNK]")
    return tok, len(vocab)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel

    root = tmp_path_factory.mktemp("clip")
    tok, n_vocab = _tokenizer()
    cfg = CLIPConfig(
        text_config=dict(vocab_size=n_vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    base = CLIPModel(cfg).eval()
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    g = torch.Generator().manual_seed(1)
    for t in CLASSES:  # fine-tuned = the vision tower (+ projection) perturbed, text tower untouched
        sd = {k: (v + 0.3 * torch.randn(v.shape, generator=g) if k.startswith(("vision_model.", "visual_projection."))
                  and v.is_floating_point() else v) for k, v in base.state_dict().items()}
        m = CLIPModel(cfg)
        m.load_state_dict(sd)
        m.save_pretrained(root / f"ft_{t}")
    rng = np.random.default_rng(0)
    tasks = []
    for i, (t, names) in enumerate(CLASSES.items()):
        files = {}
        for s in ("train", "test"):
            rows = [{"image": rng.integers(0, 256, size=(32, 32, 3)).tolist(), "label": int(rng.integers(len(names)))}
                    for _ in range(20)]
            files[s] = (_parquet if i == 0 else _jsonl)(root / "data" / t / (f"{s}.parquet" if i == 0 else f"{s}.jsonl"), rows)
        tasks.append({"name": t, "train": files["train"], "test": files["test"], "input_column": "image",
                      "class_names": names})
    spec = {"name": "tiny-clip",
            "modelpool": {"family": "clip", "base": "base", "finetuned": {t: f"ft_{t}" for t in CLASSES},
                          "prompt_templates": ["a photo of a {name}.", "a {name} ."]},
            "taskpool": {"tasks": tasks}}
    (root / "bench.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return root / "bench.yaml"


def _reference(folder: Path, base: Path, images: list, labels: np.ndarray, names: list[str], templates: list[str]) -> float:
    """Plain CLIPModel: base text tower for the prompts, `folder`'s vision tower for the images."""
    from transformers import AutoTokenizer, CLIPModel

    tb, vis = CLIPModel.from_pretrained(base).eval(), CLIPModel.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(base)
    with torch.no_grad():
        cls = []
        for n in names:
            enc = tok([t.format(name=n) for t in templates], padding=True, return_tensors="pt")
            e = tb.text_projection(tb.text_model(**enc).pooler_output)
            cls.append(F.normalize(F.normalize(e, dim=-1).mean(0), dim=-1))
        text = torch.stack(cls)
        x = torch.tensor(np.asarray(images, np.float32) / 255.0).permute(0, 3, 1, 2)
        x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
        img = F.normalize(vis.visual_projection(vis.vision_model(pixel_values=x).pooler_output), dim=-1)
        logits = tb.logit_scale.exp() * img @ text.T
    return float((logits.argmax(-1).numpy() == labels).mean())


def test_clip_spec_loads_and_matches_reference(tiny_clip):
    from searchmerge.bench.families.clip import ZERO_SHOT_STATS

    b = load_bench(tiny_clip)
    mp, tp = b.modelpool, b.taskpool
    assert b.spec.modelpool.family == "clip"
    assert tp.tasks["animals"].num_classes == 3 and tp.tasks["vehicles"].num_classes == 2
    assert all(k.startswith(("vision_model.", "visual_projection.")) for k in mp.base)
    assert "visual_projection.weight" in mp.base and set(mp.finetuned) == set(CLASSES)
    assert mp.heads["animals"]["weight"].shape == (3, 16)
    root = tiny_clip.parent
    templates = ["a photo of a {name}.", "a {name} ."]
    for t in CLASSES:
        res = evaluate(mp.model(mp.finetuned[t]), tp, "test", batch_size=7)
        split = tp.tasks[t].splits["test"]
        ref = _reference(root / f"ft_{t}", root / "base", split.inputs, split.labels, CLASSES[t], templates)
        assert res["per_task"][t] == pytest.approx(ref)
    base_res = evaluate(mp.model(), tp, "test")
    split = tp.tasks["animals"].splits["test"]
    assert base_res["per_task"]["animals"] == pytest.approx(
        _reference(root / "base", root / "base", split.inputs, split.labels, CLASSES["animals"], templates))
    # a merged vision tower through iter_evaluate: partial results, then the final one
    from searchmerge.merge import merge
    from searchmerge.recipe import Recipe

    names = list(CLASSES)
    before = dict(ZERO_SHOT_STATS)
    sd = merge(Recipe(method="task_arithmetic", base_model="b", models=[{"model": n} for n in names],
                      parameters={"lambda": 0.5}), base=mp.base, models=[mp.finetuned[n] for n in names])
    parts = list(iter_evaluate(mp.model(sd), tp, "validation", batch_size=1))
    assert "total" in parts[0] and set(parts[-1]["per_task"]) == set(names)
    assert ZERO_SHOT_STATS == before  # evaluating models never touches the text tower


def test_clip_zero_shot_heads_cached(tiny_clip, monkeypatch):
    from searchmerge.bench.families import clip as families  # the module that holds the cache state

    monkeypatch.setattr(families, "_ZERO_SHOT", {})
    monkeypatch.setattr(families, "ZERO_SHOT_STATS", {"computed": 0, "memory_hits": 0, "disk_hits": 0})
    cache = tiny_clip.parent / families.ZERO_SHOT_CACHE_DIR
    for f in cache.glob("*.safetensors"):
        f.unlink()
    b1 = load_bench(tiny_clip)
    assert families.ZERO_SHOT_STATS == {"computed": 2, "memory_hits": 0, "disk_hits": 0}
    assert len(list(cache.glob("*.safetensors"))) == 2  # on disk next to the pool
    b2 = load_bench(tiny_clip)  # same process: memory
    assert families.ZERO_SHOT_STATS["computed"] == 2 and families.ZERO_SHOT_STATS["memory_hits"] == 2
    families._ZERO_SHOT.clear()  # a new process: disk
    b3 = load_bench(tiny_clip)
    assert families.ZERO_SHOT_STATS == {"computed": 2, "memory_hits": 2, "disk_hits": 2}
    for t in CLASSES:
        assert torch.equal(b1.modelpool.heads[t]["weight"], b2.modelpool.heads[t]["weight"])
        assert torch.equal(b1.modelpool.heads[t]["weight"], b3.modelpool.heads[t]["weight"])
    # several evaluations reuse the heads; a different template is a different key
    mp = b3.modelpool
    for sd in (mp.base, mp.finetuned["animals"]):
        evaluate(mp.model(sd), b3.taskpool, "test")
    assert families.ZERO_SHOT_STATS["computed"] == 2
    spec = yaml.safe_load(tiny_clip.read_text())
    spec["modelpool"]["prompt_templates"] = ["a picture of {}."]
    load_bench(parse_bench_spec(spec, root=tiny_clip.parent))
    assert families.ZERO_SHOT_STATS["computed"] == 4


def test_clip_class_names_errors(tiny_clip, monkeypatch):
    from searchmerge.bench.families import clip as families  # the module that holds the cache state

    calls = []
    monkeypatch.setattr(families, "compute_text_heads", lambda *a, **k: calls.append(1))
    spec = yaml.safe_load(tiny_clip.read_text())
    root = tiny_clip.parent

    def with_task0(**kw):
        s = json.loads(json.dumps(spec))
        s["taskpool"]["tasks"][0].update(kw)
        return parse_bench_spec(s, root=root)

    with pytest.raises(BenchSpecError, match=r"class_names has 2 name\(s\) but the labels are 0\.\.2 \(3 classes\)"):
        load_bench(with_task0(class_names=["cat", "dog"]))
    with pytest.raises(BenchSpecError, match=r"class_names has 4 name\(s\) but the labels are 0\.\.2"):
        load_bench(with_task0(class_names=["cat", "dog", "bird", "tree"]))
    with pytest.raises(BenchSpecError, match=r"class_names has 3 name\(s\) but num_classes is 4"):
        load_bench(with_task0(num_classes=4))
    with pytest.raises(BenchSpecError, match="zero-shot heads from `class_names`"):
        load_bench(with_task0(class_names=None))
    s = json.loads(json.dumps(spec))
    s["modelpool"]["heads"] = {"animals": "h.safetensors"}
    with pytest.raises(BenchSpecError, match="remove `heads`"):
        load_bench(parse_bench_spec(s, root=root))
    s = json.loads(json.dumps(spec))
    s["modelpool"]["prompt_templates"] = ["a photo"]
    with pytest.raises(BenchSpecError, match="placeholder"):
        parse_bench_spec(s, root=root)
    assert not calls  # every error came before any text-tower work


def test_clip_leaderboard(tiny_clip, tmp_path):
    from searchmerge.bench.leaderboard import FIXED, run_leaderboard

    entries = [e for e in FIXED if e.label in ("pretrained", "individual", "task_arithmetic", "ties")]
    res = run_leaderboard(tiny_clip, tmp_path / "lb", entries=entries, progress=False)
    rows = {(r["method"], r["split"]): r for r in res["rows"]}
    for e in entries:
        for s in ("validation", "test"):
            r = rows[(e.label, s)]
            assert set(k for k in r if k.startswith("task:")) == {f"task:{t}" for t in CLASSES}
            assert 0.0 <= r["average"] <= 1.0
    assert res["paths"]["md"].is_file() and "| task_arithmetic |" in res["paths"]["md"].read_text()


@pytest.mark.timeout(240)
def test_clip_ray_path_equals_local(ray_session, tiny_clip):
    from searchmerge.bench.families import clip as families  # the module that holds the cache state

    b = load_bench(tiny_clip)
    mp, tp = b.modelpool, b.taskpool
    before = dict(families.ZERO_SHOT_STATS)
    model = mp.model(mp.finetuned["vehicles"])
    local = evaluate(model, tp, "test", batch_size=8)
    assert evaluate(model, tp, "test", backend="ray", batch_size=8, num_actors=1) == local
    assert families.ZERO_SHOT_STATS == before  # the actors get the heads with the model, nothing recomputed
