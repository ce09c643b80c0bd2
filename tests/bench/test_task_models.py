"""``seqcls_task``: HF sequence-classification folders evaluate exactly as plain transformers; heads never merged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from searchmerge.bench.evaluate import evaluate
from searchmerge.bench.pool import load_bench
from searchmerge.bench.zoo.common import write_parquet

WORDS = "alpha beta gamma delta eps zeta eta theta iota kappa".split()


def _tok():  # noqa: ANN202
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]")


def _config(arch: str):  # noqa: ANN202
    import transformers

    kw = dict(vocab_size=16, pad_token_id=0)
    if arch == "bert":
        return transformers.BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, **kw)
    if arch == "gpt2":  # GPT-2's `score` head reads the last non-pad token
        return transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=40, **kw)
    if arch == "distilbert":
        return transformers.DistilBertConfig(dim=16, n_layers=2, n_heads=2, hidden_dim=32, **kw)
    return transformers.RobertaConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                                      max_position_embeddings=40, **kw)


def _pool(root: Path, arch: str) -> tuple[Path, dict[str, object]]:
    from transformers import AutoModel, AutoModelForSequenceClassification

    torch.manual_seed(0)
    tok = _tok()
    AutoModel.from_config(_config(arch)).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    rng = np.random.default_rng(0)
    tasks, ft = [], {}
    for t, n in [("a", 3), ("b", 5)]:
        cfg = _config(arch)
        cfg.num_labels = n
        m = AutoModelForSequenceClassification.from_pretrained(str(root / "base"), config=cfg)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * torch.randn_like(p))
        m.save_pretrained(root / f"ft_{t}")
        ft[t] = m.eval()
        for s in ("train", "test"):
            texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(2, 7)))) for _ in range(40)]
            write_parquet(root / t / f"{s}.parquet", {"text": texts, "label": rng.integers(0, n, 40)})
        tasks.append({"name": t, "train": f"{t}/train.parquet", "test": f"{t}/test.parquet"})
    spec = {"modelpool": {"family": "seqcls_task", "base": "base", "finetuned": {t: f"ft_{t}" for t in ft}},
            "taskpool": {"tasks": tasks}}
    (root / "bench.yaml").write_text(yaml.safe_dump(spec))
    return root / "bench.yaml", ft


@pytest.mark.parametrize("arch", ["bert", "distilbert", "roberta", "gpt2"])
def test_individual_equals_plain_transformers(tmp_path: Path, arch: str) -> None:
    path, ft = _pool(tmp_path, arch)
    bench = load_bench(path)
    mp = bench.modelpool
    tok = _tok()
    for t, m in ft.items():
        prefix = f"{m.base_model_prefix}."
        assert set(mp.base) == {k[len(prefix):] for k in m.state_dict() if k.startswith(prefix)}
        assert not any(k.startswith(prefix) for k in mp.heads[t])  # heads are kept apart, never merged
        r = evaluate(mp.model(mp.finetuned[t]), bench.taskpool.subset([t]), "test")
        s = bench.taskpool.tasks[t].splits["test"]
        enc = tok([str(x) for x in s.inputs], padding=True, return_tensors="pt")
        with torch.no_grad():
            pred = m(**enc).logits.argmax(-1).numpy()
        assert r["per_task"][t] == pytest.approx(float((pred == s.labels).mean()), abs=0)
    runner = mp.model().runner()
    assert set(runner.module.state_dict()) == set(mp.base)


def test_chance_flag_fires_on_individual_rows(tmp_path: Path) -> None:
    from searchmerge.bench.leaderboard import Entry, chance_failures, run_leaderboard

    path, _ = _pool(tmp_path, "bert")
    bench = load_bench(path)
    assert chance_failures(bench, {"a": 1 / 3, "b": 0.9}) == ["a"]
    res = run_leaderboard(bench, tmp_path / "lb", ["test"], entries=[Entry("individual")], progress=False)
    assert all("at_or_below_chance" in r for r in res["rows"])
