"""``clip``: a CLIP model folder; the vision tower + visual projection is merged, heads are zero-shot.

Each task's head is the base text tower's normalised embeddings of prompts built from the task's
``class_names`` (FusionBench's CLIP protocol), computed once and cached in memory and on disk.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from searchmerge.bench.families.base import Family, _register
from searchmerge.bench.families.pixels import CLIP_MEAN, CLIP_STD, clip_images_to_tensor

DEFAULT_TEMPLATES = ("a photo of a {name}.",)
ZERO_SHOT_CACHE_DIR = ".searchmerge-zeroshot"
_ZERO_SHOT: dict[str, torch.Tensor] = {}  # in-memory cache: key hash -> normalised text embeddings [C, D] * scale
ZERO_SHOT_STATS = {"computed": 0, "memory_hits": 0, "disk_hits": 0}


def _folder_fingerprint(folder: Path) -> str:
    """The resolved folder path + name, size and mtime of every file in it (cheap; a rewrite changes it)."""
    folder = folder.resolve()
    parts = [str(folder)]
    for f in sorted(folder.iterdir()):
        if f.is_file():
            st = f.stat()
            parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    return "\n".join(parts)


def zero_shot_key(base_folder: str | Path, class_names: list[str], templates: list[str]) -> str:
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    h.update(json.dumps({"folder": _folder_fingerprint(Path(base_folder)), "class_names": list(class_names),
                         "templates": list(templates)}, sort_keys=True).encode())
    return h.hexdigest()


def _format_prompt(template: str, name: str) -> str:
    return template.format(name, name=name)


@torch.inference_mode()
def compute_text_heads(clip: nn.Module, tokenizer: Any, class_names: list[str], templates: list[str]) -> torch.Tensor:
    """``logit_scale.exp() * t`` [C, D], t = L2-normalised text embeddings (mean over templates, re-normalised)."""
    max_len = int(clip.config.text_config.max_position_embeddings)
    embs = []
    for name in class_names:
        prompts = [_format_prompt(t, name) for t in templates]
        enc = tokenizer(prompts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        out = clip.text_model(input_ids=enc["input_ids"], attention_mask=enc.get("attention_mask"))
        e = F.normalize(clip.text_projection(out.pooler_output).float(), dim=-1).mean(0)
        embs.append(F.normalize(e, dim=-1))
    return clip.logit_scale.exp().float() * torch.stack(embs)


def clip_zero_shot_heads(base_folder: str | Path, tasks: dict[str, list[str]], templates: list[str] | None = None,
                         cache_dir: str | Path | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Zero-shot head ``{weight: scale * text_n [C, D], bias: 0 [C]}`` per task; computed once per key.

    Key: hash of the base folder (path + files), the class names and the templates. Looked up in memory,
    then in ``cache_dir/<key>.safetensors``; computed with the base text tower only when both miss.
    """
    from safetensors.torch import load_file, save_file

    templates = list(templates or DEFAULT_TEMPLATES)
    keys = {t: zero_shot_key(base_folder, names, templates) for t, names in tasks.items()}
    cdir = Path(cache_dir) if cache_dir is not None else None
    todo = []
    for t, k in keys.items():
        if k in _ZERO_SHOT:
            ZERO_SHOT_STATS["memory_hits"] += 1
            continue
        f = cdir / f"{k}.safetensors" if cdir is not None else None
        if f is not None and f.is_file():
            try:
                _ZERO_SHOT[k] = load_file(str(f))["weight"]
                ZERO_SHOT_STATS["disk_hits"] += 1
                continue
            except Exception:  # noqa: BLE001 - a damaged cache file is recomputed
                pass
        todo.append(t)
    if todo:
        from transformers import AutoTokenizer, CLIPModel

        clip = CLIPModel.from_pretrained(str(base_folder)).eval()
        tok = AutoTokenizer.from_pretrained(str(base_folder))
        for t in todo:
            w = compute_text_heads(clip, tok, tasks[t], templates).contiguous()
            _ZERO_SHOT[keys[t]] = w
            ZERO_SHOT_STATS["computed"] += 1
            if cdir is not None:
                try:
                    cdir.mkdir(parents=True, exist_ok=True)
                    tmp = cdir / f".{keys[t]}.tmp-{os.getpid()}"
                    save_file({"weight": w}, str(tmp), metadata={"class_names": json.dumps(tasks[t]),
                                                                "templates": json.dumps(templates)})
                    os.replace(tmp, cdir / f"{keys[t]}.safetensors")
                except OSError:
                    pass  # read-only pool folder: the in-memory cache still holds it
    return {t: {"weight": _ZERO_SHOT[k], "bias": torch.zeros(_ZERO_SHOT[k].shape[0])} for t, k in keys.items()}


@_register
class CLIPFamily(Family):
    name = "clip"
    zero_shot = True

    def load_folder(self, folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """A ``CLIPModel`` folder (or a ``CLIPVisionModelWithProjection`` one): vision tower + visual projection."""
        config = json.loads((folder / "config.json").read_text())
        mt = config.get("model_type")
        if mt == "clip":
            from transformers import CLIPModel

            model = CLIPModel.from_pretrained(str(folder))
            cfg = model.config.vision_config.to_dict()
            cfg["projection_dim"] = int(model.config.projection_dim)
        elif mt == "clip_vision_model":
            from transformers import CLIPVisionModelWithProjection

            model = CLIPVisionModelWithProjection.from_pretrained(str(folder))
            cfg = model.config.to_dict()
        else:
            raise ValueError(f"config.json model_type is {mt!r}, expected 'clip' (or 'clip_vision_model')")
        sd = {k: v.detach().clone() for k, v in model.state_dict().items()
              if k.startswith(("vision_model.", "visual_projection."))}
        if "visual_projection.weight" not in sd:
            raise ValueError("no visual_projection.weight (a CLIPVisionModel without projection cannot be used)")
        cfg["model_type"] = "clip_vision_model"
        return cfg, sd

    def feature_dim(self, config: dict[str, Any]) -> int | None:
        return int(config["projection_dim"])

    def build(self, config: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> nn.Module:
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        cfg = {k: v for k, v in config.items() if k != "model_type"}
        model = CLIPVisionModelWithProjection(CLIPVisionConfig(**cfg))
        model.load_state_dict(state_dict, strict=True)
        return model.eval()

    def preprocess(self, task: Any, split: str, base_folder: str) -> dict[str, np.ndarray]:
        cfg = json.loads((Path(base_folder) / "config.json").read_text())
        vc = cfg.get("vision_config", cfg)
        size = int(vc.get("image_size", 224))
        mean, std = CLIP_MEAN, CLIP_STD
        pp = Path(base_folder) / "preprocessor_config.json"
        if pp.is_file():
            p = json.loads(pp.read_text())
            mean, std = tuple(p.get("image_mean", mean)), tuple(p.get("image_std", std))
        return {"pixels": clip_images_to_tensor(task.splits[split].inputs, size, mean, std).numpy()}

    def features(self, module: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.normalize(module(pixel_values=batch["pixels"]).image_embeds.float(), dim=-1)

    def task_heads(self, base_folder: str, tasks: dict[str, list[str]], templates: list[str] | None,
                   cache_dir: str | Path | None) -> dict[str, dict[str, torch.Tensor]]:
        return clip_zero_shot_heads(base_folder, tasks, templates, cache_dir)
