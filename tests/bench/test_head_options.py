"""The head option is explicit: the same checkpoints under a mismatched head option score at chance, and the
leaderboard says so loudly; under their own heads (``seqcls_task``) they do not."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from searchmerge.bench.leaderboard import Entry, run_leaderboard
from searchmerge.bench.pool import load_bench
from searchmerge.bench.zoo.common import write_parquet
from tests.bench.test_task_models import WORDS, _config, _tok

CUES = {"a": ["alpha", "beta", "gamma"], "b": ["delta", "eps"]}  # the label is which cue word the text holds


def _texts(rng: np.random.Generator, cues: list[str], k: int) -> tuple[list[str], np.ndarray]:
    """Balanced labels (k per class); each text is filler words around its class's cue word."""
    filler = [w for w in WORDS if not any(w in c for c in CUES.values())]
    y = np.repeat(np.arange(len(cues)), k)
    texts = [" ".join(list(rng.choice(filler, 3)) + [cues[c]] + list(rng.choice(filler, 2))) for c in y]
    return texts, y


def _fine_tuned_pool(root: Path) -> None:
    """A BERT base and one fully fine-tuned ``BertForSequenceClassification`` per task (AdamW, 60 steps)."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    tok = _tok()
    AutoModel.from_config(_config("bert")).save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    tasks = []
    for t, cues in CUES.items():
        for s in ("train", "test"):
            x, y = _texts(rng, cues, 12)
            write_parquet(root / t / f"{s}.parquet", {"text": x, "label": y})
        x, y = _texts(rng, cues, 12)
        cfg = _config("bert")
        cfg.num_labels = len(cues)
        m = AutoModelForSequenceClassification.from_pretrained(str(root / "base"), config=cfg)
        opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
        enc = tok(x, padding=True, return_tensors="pt")
        m.train()
        for _ in range(60):
            opt.zero_grad()
            m(**enc, labels=torch.as_tensor(y)).loss.backward()
            opt.step()
        m.eval().save_pretrained(root / f"ft_{t}")
        sd = m.state_dict()  # the classifier alone, as a separate head file (what `family: seqcls` reads)
        save_file({"weight": sd["classifier.weight"].contiguous(), "bias": sd["classifier.bias"].contiguous()},
                  str(root / f"head_{t}.safetensors"))
        tasks.append({"name": t, "train": f"{t}/train.parquet", "test": f"{t}/test.parquet"})
    own = {"family": "seqcls_task", "base": "base", "finetuned": {t: f"ft_{t}" for t in CUES}}
    mean_pool = {"family": "seqcls", "base": "base", "finetuned": {t: f"ft_{t}" for t in CUES},
                 "heads": {t: f"head_{t}.safetensors" for t in CUES}}
    for name, mp in [("own", own), ("mean_pool", mean_pool)]:
        (root / f"{name}.yaml").write_text(yaml.safe_dump({"modelpool": mp, "taskpool": {"tasks": tasks}}))


@pytest.mark.timeout(120)
def test_chance_flag_fires_on_a_mismatched_head_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fine_tuned_pool(tmp_path)
    rows = {}
    for name in ("own", "mean_pool"):
        res = run_leaderboard(load_bench(tmp_path / f"{name}.yaml"), tmp_path / f"lb_{name}", ["test"],
                              entries=[Entry("individual")], progress=False)
        rows[name] = res["rows"][0]
    err = capsys.readouterr().err
    chance = {t: 1 / len(c) for t, c in CUES.items()}
    own, mean_pool = rows["own"], rows["mean_pool"]
    assert all(own[f"task:{t}"] > 0.75 for t in CUES) and own["at_or_below_chance"] == "", str(rows)
    # measured: own heads a 1.00, b 0.92; mean-pooled tokens into the same classifiers a 0.64, b 0.00
    low = [t for t in CUES if mean_pool[f"task:{t}"] <= chance[t]]  # same checkpoints, the wrong head option
    assert low and mean_pool["at_or_below_chance"] == ",".join(low)
    assert err.count("WARNING: individual model(s) at or below chance") == 1 and str(low) in err
    md = (tmp_path / "lb_mean_pool" / "leaderboard.md").read_text()
    assert "at/below chance" in md and "at/below chance" not in (tmp_path / "lb_own" / "leaderboard.md").read_text()
