"""The transformers families and the image family on TINY models made here (nothing downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from searchmerge.bench import evaluate, load_bench
from searchmerge.bench.families import MobileNetV2, MobileNetV2Backbone, images_to_tensor
from searchmerge.merge import merge
from searchmerge.recipe import Recipe

WORDS = "good bad great awful movie film plot actor the a is was very not fun dull cat dog red blue yes no".split()


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _perturbed(sd: dict, seed: int, scale: float = 0.05) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: (v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point() else v) for k, v in sd.items()}


def _head(path: Path, n_out: int, n_in: int, seed: int) -> str:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"weight": torch.randn(n_out, n_in, generator=g), "bias": torch.randn(n_out, generator=g)}, str(path))
    return str(path)


def _sentences(rng: np.random.Generator, n: int) -> list[str]:
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(2, 9)))) for _ in range(n)]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    from transformers import BertConfig, BertModel, BertTokenizer

    root = tmp_path_factory.mktemp("bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizer(vocab_file=str(root / "vocab.txt"))
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    base = BertModel(cfg).eval()
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    for i, t in enumerate(["sent", "topic"]):
        m = BertModel(cfg)
        m.load_state_dict(_perturbed(base.state_dict(), i + 1))
        m.save_pretrained(root / f"ft_{t}")
    rng = np.random.default_rng(0)
    tasks = []
    for t, k in [("sent", 2), ("topic", 3)]:
        files = {s: _jsonl(root / t / f"{s}.jsonl", [{"text": x, "label": int(rng.integers(k))} for x in _sentences(rng, 40)])
                 for s in ("train", "test")}
        tasks.append({"name": t, "train": files["train"], "test": files["test"], "input_column": "text"})
    spec = {"modelpool": {"family": "seqcls", "base": str(root / "base"),
                          "finetuned": {"sent": str(root / "ft_sent"), "topic": str(root / "ft_topic")},
                          "heads": {"sent": _head(root / "h/sent.safetensors", 2, 32, 1),
                                    "topic": _head(root / "h/topic.safetensors", 3, 32, 2)}},
            "taskpool": {"tasks": tasks}}
    (root / "bench.yaml").write_text(yaml.safe_dump(spec))
    return root / "bench.yaml"


def test_seqcls_tiny_bert(tiny_bert):
    from transformers import AutoModel, AutoTokenizer

    b = load_bench(tiny_bert)
    mp, tp = b.modelpool, b.taskpool
    assert tp.tasks["topic"].num_classes == 3 and len(tp.tasks["sent"].splits["validation"]) == 4
    res = evaluate(mp.model(mp.finetuned["sent"]), tp, "test", batch_size=7)
    # reference: plain transformers forward, mean pooling, the task head
    folder = tiny_bert.parent / "ft_sent"
    m, tok = AutoModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(tiny_bert.parent / "base")
    split = tp.tasks["sent"].splits["test"]
    with torch.no_grad():
        enc = tok(split.inputs, padding=True, return_tensors="pt")
        h = m(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        pooled = (h * mask).sum(1) / mask.sum(1)
        head = mp.heads["sent"]
        pred = (pooled @ head["weight"].T + head["bias"]).argmax(-1).numpy()
    assert res["per_task"]["sent"] == pytest.approx(float((pred == split.labels).mean()))
    names = ["sent", "topic"]
    sd = merge(Recipe(method="task_arithmetic", base_model="b", models=[{"model": n} for n in names],
                      parameters={"lambda": 0.5}), base=mp.base, models=[mp.finetuned[n] for n in names])
    out = evaluate(mp.model(sd), tp, "validation")
    assert set(out["per_task"]) == {"sent", "topic"} and 0.0 <= out["average"] <= 1.0


def test_causal_lm_multiple_choice_tiny_gpt2(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]"] + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]")
    cfg = GPT2Config(vocab_size=len(vocab), n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    base = GPT2LMHeadModel(cfg).eval()
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    ft = GPT2LMHeadModel(cfg)
    ft.load_state_dict(_perturbed(base.state_dict(), 3, 0.2))
    ft.eval()
    ft.save_pretrained(tmp_path / "ft")
    rng = np.random.default_rng(1)
    rows = []
    for x in _sentences(rng, 30):
        k = int(rng.integers(2, 5))  # a varying number of choices per row
        rows.append({"prompt": x, "options": [" ".join(rng.choice(WORDS, size=int(rng.integers(1, 4)))) for _ in range(k)],
                     "label": int(rng.integers(k))})
    f = _jsonl(tmp_path / "mc.jsonl", rows)
    spec = {"modelpool": {"family": "causal_lm_mc", "base": str(tmp_path / "base"), "finetuned": {"mc": str(tmp_path / "ft")}},
            "taskpool": {"tasks": [{"name": "mc", "train": f, "validation": f, "test": f, "input_column": "prompt",
                                    "choices_column": "options", "num_classes": 4}]}}
    (tmp_path / "bench.yaml").write_text(yaml.safe_dump(spec))
    b = load_bench(tmp_path / "bench.yaml")
    res = evaluate(b.modelpool.model(b.modelpool.finetuned["mc"]), b.taskpool, "test", batch_size=4)
    # reference: score every (prompt, choice) alone, unpadded
    correct = 0
    with torch.no_grad():
        for r in rows:
            p = tok(r["prompt"])["input_ids"]
            scores = []
            for ch in r["options"]:
                a = tok(" " + ch)["input_ids"]
                ids = torch.tensor([p + a])
                logp = torch.log_softmax(ft(ids).logits[0, :-1], -1)
                scores.append(sum(float(logp[len(p) + j - 1, a[j]]) for j in range(len(a))))
            correct += int(np.argmax(scores) == r["label"])
    assert res["per_task"]["mc"] == pytest.approx(correct / len(rows))
    bad = {**spec, "taskpool": {"tasks": [{**spec["taskpool"]["tasks"][0], "num_classes": 2}]}}
    from searchmerge.bench.pool import BenchSpecError, parse_bench_spec

    with pytest.raises(BenchSpecError, match="out of range"):
        load_bench(parse_bench_spec(bad))


def test_image_family_tiny_mobilenet(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    bb = MobileNetV2Backbone().eval()
    full = MobileNetV2()
    missing = full.load_state_dict(bb.state_dict(), strict=False)
    assert not missing.unexpected_keys and set(missing.missing_keys) == {"classifier.1.weight", "classifier.1.bias"}
    for name, sd in [("base", bb.state_dict()), ("ft", _perturbed(bb.state_dict(), 5, 0.01))]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps({"model_type": "searchmerge_mobilenet_v2", "image_size": 32}))
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / name / "model.safetensors"))
    rng = np.random.default_rng(0)
    rows = [{"image": rng.random(64).tolist(), "label": int(rng.integers(3))} for _ in range(24)]
    f = _jsonl(tmp_path / "img.jsonl", rows)
    spec = {"modelpool": {"family": "image", "base": str(tmp_path / "base"), "finetuned": {"t": str(tmp_path / "ft")},
                          "heads": {"t": _head(tmp_path / "h.safetensors", 3, 1280, 0)}},
            "taskpool": {"tasks": [{"name": "t", "train": f, "test": f, "input_column": "image"}]}}
    (tmp_path / "bench.yaml").write_text(yaml.safe_dump(spec))
    b = load_bench(tmp_path / "bench.yaml")
    res = evaluate(b.modelpool.model(), b.taskpool, "test", batch_size=10)
    with torch.no_grad():
        x = images_to_tensor([r["image"] for r in rows], 32)
        h = b.modelpool.heads["t"]
        pred = (bb(x) @ h["weight"].T + h["bias"]).argmax(-1).numpy()
    assert res["per_task"]["t"] == pytest.approx(float((pred == np.array([r["label"] for r in rows])).mean()))


def test_seqcls_prefix_cache_gives_same_metrics(tiny_bert, tmp_path):
    """Cached output of the frozen lower layers + top layers only == full forward (same metrics)."""
    from transformers import BertModel

    spec = yaml.safe_load(tiny_bert.read_text())
    root = tiny_bert.parent
    base = BertModel.from_pretrained(root / "base")
    for i, t in enumerate(["sent", "topic"]):  # fine-tuned above layer 1 only
        sd = base.state_dict()
        top = _perturbed({k: v for k, v in sd.items() if k.startswith("encoder.layer.1.")}, 10 + i, 0.2)
        m = BertModel(base.config)
        m.load_state_dict({**sd, **top})
        m.save_pretrained(tmp_path / f"ft_{t}")
        spec["modelpool"]["finetuned"][t] = str(tmp_path / f"ft_{t}")
    from searchmerge.bench.pool import parse_bench_spec

    plain = load_bench(parse_bench_spec(spec))
    cached = load_bench(parse_bench_spec({**spec, "modelpool": {**spec["modelpool"], "cache_prefix_layers": 1}}))
    names = ["sent", "topic"]
    for b in (plain, cached):
        mp = b.modelpool
        sd = merge(Recipe(method="ties", base_model="b", models=[{"model": n} for n in names],
                          parameters={"density": 0.5, "lambda": 0.7}), base=mp.base, models=[mp.finetuned[n] for n in names])
        b.results = [evaluate(mp.model(s), b.taskpool, "test", batch_size=9) for s in (mp.base, mp.finetuned["sent"], sd)]
    assert cached.results == plain.results
    prefixed = [k for k in cached.taskpool._features if len(k) == 7]
    assert len({k[-1] for k in prefixed}) == 1  # base, fine-tuned and merged share one cached prefix
