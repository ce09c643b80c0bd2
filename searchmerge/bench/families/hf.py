"""``transformers`` families: ``seqcls`` (encoder, mean pooling, separate linear heads) and ``causal_lm_mc``.

``seqcls`` is the explicit mean-pooling option: one linear head per task from separate safetensors files
on the mean of the encoder's token outputs. Standard ``…ForSequenceClassification`` checkpoints (their own
pooler / classifier) are ``seqcls_task`` (:mod:`searchmerge.bench.families.task`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from searchmerge.bench.families.base import MAX_TOKENS, Family, _register


def _config_from_dict(config: dict[str, Any]):  # noqa: ANN202
    from transformers import AutoConfig

    cfg = dict(config)
    return AutoConfig.for_model(cfg.pop("model_type"), **cfg)


def _tokenizer(base_folder: str):  # noqa: ANN202
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_folder)


class TransformersFamily(Family):
    """A ``transformers`` checkpoint folder, loaded and rebuilt through one auto class."""

    auto_class = "AutoModel"

    def _auto(self):  # noqa: ANN202
        import transformers

        return getattr(transformers, self.auto_class)

    def load_folder(self, folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        model = self._auto().from_pretrained(str(folder))
        cfg = model.config.to_dict()
        return cfg, {k: v.detach().clone() for k, v in model.state_dict().items()}

    def build(self, config: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> nn.Module:
        model = self._auto().from_config(_config_from_dict(config))
        model.load_state_dict(state_dict, strict=True)
        return model.eval()


@_register
class SeqClsFamily(TransformersFamily):
    name = "seqcls"

    def feature_dim(self, config: dict[str, Any]) -> int | None:
        return int(config["hidden_size"])

    def preprocess(self, task: Any, split: str, base_folder: str) -> dict[str, np.ndarray]:
        tok = _tokenizer(base_folder)
        enc = tok([str(t) for t in task.splits[split].inputs], padding=True, truncation=True,
                  max_length=MAX_TOKENS, return_tensors="np")
        return {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}

    def features(self, module: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = batch["attention_mask"]
        n = int(mask.sum(1).max())  # drop all-padding columns (results are unchanged)
        mask = mask[:, :n]
        if "hidden" in batch:  # cached prefix output: run the remaining layers only
            h = batch["hidden"][:, :n]
            k = int(batch["prefix_layers"].reshape(-1)[0])
            ext = (1.0 - mask[:, None, None, :].to(h.dtype)) * torch.finfo(h.dtype).min
            for layer in module.encoder.layer[k:]:
                r = layer(h, attention_mask=ext)
                h = r[0] if isinstance(r, tuple) else r
        else:
            h = module(input_ids=batch["input_ids"][:, :n], attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp_min(1.0)

    def prefix_keys(self, state_dict: dict[str, torch.Tensor], k: int) -> list[str]:
        lower = tuple(f"encoder.layer.{i}." for i in range(k))
        return [key for key in state_dict if key.startswith("embeddings.") or key.startswith(lower)]

    @torch.inference_mode()
    def prefix_features(self, module: nn.Module, feats: dict[str, np.ndarray], k: int, batch: int = 64) -> dict[str, np.ndarray]:
        """Output of embeddings + layers < k for every row, zero-padded to the split's width."""
        ids, mask = feats["input_ids"], feats["attention_mask"]
        full = module.encoder.layer
        module.encoder.layer = full[:k]
        try:
            hidden = np.zeros((ids.shape[0], ids.shape[1], module.config.hidden_size), np.float32)
            for s in range(0, len(ids), batch):
                m = torch.as_tensor(mask[s:s + batch])
                n = int(m.sum(1).max())
                h = module(input_ids=torch.as_tensor(ids[s:s + batch, :n]), attention_mask=m[:, :n]).last_hidden_state
                hidden[s:s + batch, :n] = (h * m[:, :n].unsqueeze(-1)).numpy()
        finally:
            module.encoder.layer = full
        return {"hidden": hidden, "attention_mask": mask, "prefix_layers": np.full(len(ids), k, np.int64)}


@_register
class CausalMCFamily(TransformersFamily):
    name = "causal_lm_mc"
    auto_class = "AutoModelForCausalLM"
    needs_heads = False

    def preprocess(self, task: Any, split: str, base_folder: str) -> dict[str, np.ndarray]:
        tok = _tokenizer(base_folder)
        s = task.splits[split]
        rows = []
        for i, prompt in enumerate(s.inputs):
            choices = s.choices[i] if s.choices is not None else task.spec.choices
            p_ids = tok(str(prompt), add_special_tokens=False)["input_ids"]
            seqs = []
            for ch in choices:
                a_ids = tok(" " + str(ch), add_special_tokens=False)["input_ids"]
                ids = (p_ids + a_ids)[-MAX_TOKENS:]
                n_ans = min(len(a_ids), len(ids) - 1)
                seqs.append((ids, n_ans))
            rows.append(seqs)
        k = max(len(r) for r in rows)
        L = max(len(ids) for r in rows for ids, _ in r)
        ids_arr = np.zeros((len(rows), k, L), np.int64)
        att = np.zeros((len(rows), k, L), np.int64)
        ans = np.zeros((len(rows), k, L), np.int64)
        for i, r in enumerate(rows):
            for j, (ids, n_ans) in enumerate(r):
                ids_arr[i, j, : len(ids)] = ids
                att[i, j, : len(ids)] = 1
                ans[i, j, len(ids) - n_ans : len(ids)] = 1
        return {"input_ids": ids_arr, "attention_mask": att, "answer_mask": ans}

    def logits(self, module: nn.Module, head: nn.Module | None, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Each choice's summed answer log-likelihood ``[B, K]`` (-inf for padding choices)."""
        ids, att, ans = batch["input_ids"], batch["attention_mask"], batch["answer_mask"]
        b, k, L = ids.shape
        ids, att, ans = ids.reshape(b * k, L), att.reshape(b * k, L), ans.reshape(b * k, L)
        valid = att.sum(1) > 0
        logits = module(input_ids=ids, attention_mask=att.clamp_min(0)).logits.float()
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        score = (logp * ans[:, 1:].to(logp.dtype)).sum(1)
        score = torch.where(valid, score, torch.full_like(score, float("-inf")))
        return score.reshape(b, k)
