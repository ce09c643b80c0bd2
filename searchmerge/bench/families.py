"""Architecture families: how a folder loads, how inputs are preprocessed, how a backbone + head predicts.

* ``seqcls`` — an encoder (BERT-style, ``AutoModel.from_pretrained``) with mean pooling and one linear
  head per task (FusionBench's protocol for non-CLIP models: the merged backbone, each task's own head).
* ``causal_lm_mc`` — a causal LM (``AutoModelForCausalLM.from_pretrained``) answering multiple choice by
  the summed log-likelihood of each answer's tokens; no heads.
* ``image`` — the project's MobileNetV2 (torchvision-compatible) features + per-task linear heads.
* ``mlp`` — a plain MLP trunk on feature vectors + per-task heads (the fixture zoo).
* ``clip`` — a CLIP model folder (``CLIPModel``); the vision tower + visual projection is what is merged,
  each task's head is zero-shot: the base text tower's normalised embeddings of prompts built from the
  task's ``class_names`` (FusionBench's CLIP protocol), computed once and cached in memory and on disk.

A :class:`BenchModel` is a plain picklable bundle (family name, config, backbone state dict, heads), so
the same object is evaluated in-process or shipped to Ray actors.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from searchmerge.errors import SearchmergeError

FAMILIES: dict[str, "Family"] = {}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_TOKENS = 64


def get_family(name: str) -> "Family":
    if name not in FAMILIES:
        raise SearchmergeError(f"unknown family `{name}`; families: {sorted(FAMILIES)}.")
    return FAMILIES[name]


def _register(cls: type["Family"]) -> type["Family"]:
    FAMILIES[cls.name] = cls()
    return cls


def _load_safetensors_folder(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors file in {folder}")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(str(f)))
    return sd


def _head_module(h: dict[str, torch.Tensor]) -> nn.Linear:
    lin = nn.Linear(h["weight"].shape[1], h["weight"].shape[0])
    with torch.no_grad():
        lin.weight.copy_(h["weight"].float())
        lin.bias.copy_(h["bias"].float())
    return lin.eval()


class Family:
    name = ""
    needs_heads = True
    zero_shot = False  # heads are computed from the task pool (class names), not read from the spec

    def load_folder(self, folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """``(config, backbone state dict)`` of a local model folder; raises if it does not load."""
        raise NotImplementedError

    def feature_dim(self, config: dict[str, Any]) -> int | None:
        return None

    def build(self, config: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> nn.Module:
        raise NotImplementedError

    def preprocess(self, task: Any, split: str, base_folder: str) -> dict[str, np.ndarray]:
        """Model-ready arrays for one split of one task (zero is padding in every array)."""
        raise NotImplementedError

    def features(self, module: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def prefix_keys(self, state_dict: dict[str, torch.Tensor], k: int) -> list[str]:
        """Tensors that determine the cached prefix output (families without prefix caching: none)."""
        return []

    def prefix_features(self, module: nn.Module, feats: dict[str, np.ndarray], k: int) -> dict[str, np.ndarray]:
        raise NotImplementedError(f"family `{self.name}` has no prefix cache")

    def predict(self, module: nn.Module, head: nn.Module | None, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return head(self.features(module, batch)).argmax(-1)


# --- mlp (fixture zoo) ------------------------------------------------------------------------------


class MLPTrunk(nn.Module):
    def __init__(self, sizes: list[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(len(sizes) - 1):
            layers += [nn.Linear(sizes[i], sizes[i + 1]), nn.ReLU()]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _load_project_folder(family: "Family", folder: Path, model_type: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A folder of one of the project's own architectures: check ``model_type``, load, build strictly."""
    config = json.loads((folder / "config.json").read_text())
    if config.get("model_type") != model_type:
        raise ValueError(f"config.json model_type is {config.get('model_type')!r}, expected {model_type!r}")
    sd = _load_safetensors_folder(folder)
    family.build(config, sd)  # strict load check
    return config, sd


@_register
class MLPFamily(Family):
    name = "mlp"

    def load_folder(self, folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return _load_project_folder(self, folder, "searchmerge_mlp")

    def feature_dim(self, config: dict[str, Any]) -> int | None:
        return int(config["sizes"][-1])

    def build(self, config: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> nn.Module:
        m = MLPTrunk(list(config["sizes"]))
        m.load_state_dict(state_dict, strict=True)
        return m.eval()

    def preprocess(self, task: Any, split: str, base_folder: str) -> dict[str, np.ndarray]:
        return {"x": np.asarray(task.splits[split].inputs, dtype=np.float32)}

    def features(self, module: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return module(batch["x"])


# --- image (MobileNetV2, torchvision-compatible) -------------------------------------------------------


def _div(v: float, d: int = 8) -> int:
    n = max(d, int(v + d / 2) // d * d)
    return n + d if n < 0.9 * v else n


class ConvBNReLU(nn.Sequential):
    def __init__(self, i: int, o: int, k: int = 3, st: int = 1, g: int = 1) -> None:
        super().__init__(nn.Conv2d(i, o, k, st, (k - 1) // 2, groups=g, bias=False), nn.BatchNorm2d(o), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    def __init__(self, i: int, o: int, st: int, e: int) -> None:
        super().__init__()
        h = int(round(i * e))
        self.use_res = st == 1 and i == o
        layers: list[nn.Module] = [] if e == 1 else [ConvBNReLU(i, h, 1)]
        self.conv = nn.Sequential(*layers, ConvBNReLU(h, h, st=st, g=h), nn.Conv2d(h, o, 1, 1, 0, bias=False), nn.BatchNorm2d(o))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    """torchvision's MobileNetV2 layout (loads ``mobilenet_v2-b0353104.pth`` with ``strict=True``)."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        c, feats = 32, [ConvBNReLU(3, 32, st=2)]
        for t, ch, n, st in [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1]]:
            for j in range(n):
                feats.append(InvertedResidual(c, ch, st if j == 0 else 1, t))
                c = ch
        feats.append(ConvBNReLU(c, 1280, 1))
        self.features = nn.Sequential(*feats)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.forward_features(x))


class MobileNetV2Backbone(nn.Module):
    """MobileNetV2 without the ImageNet classifier: the merged part of the image zoo."""

    def __init__(self) -> None:
        super().__init__()
        self.features = MobileNetV2().features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)


def images_to_tensor(images: list[Any], size: int) -> torch.Tensor:
    """Grey or RGB images (nested lists, or flat square lists), values in [0, 1] or [0, 255] -> normalised [N,3,S,S]."""
    x = torch.stack([_image_chw(im) for im in images])
    if float(x.max()) > 1.5:
        x = x / 255.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


@_register
class ImageFamily(Family):
    name = "image"

    def load_folder(self, folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        return _load_project_folder(self, folder, "searchmerge_mobilenet_v2")

    def feature_dim(self, config: dict[str, Any]) -> int | None:
        return 1280

    def build(self, config: dict[str, Any], state_dict: dict[str, torch.Tensor]) -> nn.Module:
        m = MobileNetV2Backbone()
        m.load_state_dict(state_dict, strict=True)
        return m.eval()

    def preprocess(self, task: Any, split: str, base_folder: str) -> dict[str, np.ndarray]:
        cfg = json.loads((Path(base_folder) / "config.json").read_text())
        x = images_to_tensor(task.splits[split].inputs, int(cfg.get("image_size", 32)))
        return {"pixels": x.numpy()}

    def features(self, module: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return module(batch["pixels"])


# --- transformers families ------------------------------------------------------------------------


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

    def predict(self, module: nn.Module, head: nn.Module | None, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ids, att, ans = batch["input_ids"], batch["attention_mask"], batch["answer_mask"]
        b, k, L = ids.shape
        ids, att, ans = ids.reshape(b * k, L), att.reshape(b * k, L), ans.reshape(b * k, L)
        valid = att.sum(1) > 0
        logits = module(input_ids=ids, attention_mask=att.clamp_min(0)).logits.float()
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        score = (logp * ans[:, 1:].to(logp.dtype)).sum(1)
        score = torch.where(valid, score, torch.full_like(score, float("-inf")))
        return score.reshape(b, k).argmax(-1)


# --- clip (vision tower merged, zero-shot text heads) ------------------------------------------------

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DEFAULT_TEMPLATES = ("a photo of a {name}.",)
ZERO_SHOT_CACHE_DIR = ".searchmerge-zeroshot"
_ZERO_SHOT: dict[str, torch.Tensor] = {}  # in-memory cache: key hash -> normalised text embeddings [C, D] * scale
ZERO_SHOT_STATS = {"computed": 0, "memory_hits": 0, "disk_hits": 0}


def _image_chw(im: Any) -> torch.Tensor:
    """One grey / RGB image (nested lists, flat square list, HxW, HxWx3 or 3xHxW) -> float [3, H, W] as given."""
    a = np.asarray(im, dtype=np.float32)
    if a.ndim == 1:
        s = int(round(np.sqrt(a.size)))
        if s * s != a.size:
            raise ValueError(f"flat image of {a.size} values is not square")
        a = a.reshape(s, s)
    if a.ndim == 2:
        a = np.repeat(a[None], 3, axis=0)
    elif a.ndim == 3 and a.shape[-1] in (1, 3) and a.shape[0] not in (1, 3):
        a = np.transpose(a, (2, 0, 1))
    if a.shape[0] == 1:
        a = np.repeat(a, 3, axis=0)
    return torch.from_numpy(np.ascontiguousarray(a))


def clip_images_to_tensor(images: list[Any], size: int, mean: Any = CLIP_MEAN, std: Any = CLIP_STD) -> torch.Tensor:
    """CLIP preprocessing without PIL: shortest side -> ``size`` (bicubic), centre crop, CLIP mean / std.

    Values in [0, 255] (any value > 1.5 in the batch) are scaled to [0, 1] first, as in ``images_to_tensor``.
    """
    ims = [_image_chw(im) for im in images]
    scale = 255.0 if max(float(x.max()) for x in ims) > 1.5 else 1.0
    out = []
    for x in ims:
        x = x / scale
        h, w = x.shape[-2:]
        if (h, w) != (size, size):
            r = size / min(h, w)
            nh, nw = max(size, int(round(h * r))), max(size, int(round(w * r)))
            x = F.interpolate(x[None], size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)[0]
            top, left = (nh - size) // 2, (nw - size) // 2
            x = x[:, top:top + size, left:left + size]
        out.append(x)
    x = torch.stack(out)
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    sd = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - m) / sd


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


# --- the model bundle -----------------------------------------------------------------------------


@dataclass
class BenchModel:
    """A backbone state dict + the task heads, evaluable in-process or on Ray actors (picklable)."""

    family: str
    config: dict[str, Any]
    backbone: dict[str, torch.Tensor]
    heads: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    base_folder: str = ""
    name: str = "model"
    prefix_layers: int | None = None
    task_configs: dict[str, dict[str, Any]] = field(default_factory=dict)  # seqcls_task: each task's own config

    def prefix_hash(self) -> str | None:
        """Hash of the tensors behind the cached prefix (None: no prefix caching for this model)."""
        if not self.prefix_layers:
            return None
        import hashlib

        keys = get_family(self.family).prefix_keys(self.backbone, self.prefix_layers)
        if not keys:
            return None
        h = hashlib.blake2b(digest_size=16)
        for key in sorted(keys):
            t = self.backbone[key].detach().cpu()
            if t.is_floating_point():
                t = t + 0.0  # -0.0 -> +0.0: a delta merge adds +0.0 to unchanged tensors (same values)
            t = t.contiguous()
            h.update(key.encode())
            h.update(str(t.dtype).encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()

    def runner(self) -> "Runner":
        fam = get_family(self.family)
        if getattr(fam, "heads_from_folders", False):  # task models: each task's own architecture and head
            module = fam.build_runner_module(self.config, self.backbone, self.heads, self.task_configs)  # type: ignore[attr-defined]
            return Runner(fam, module, {t: module for t in self.heads})
        return Runner(fam, fam.build(self.config, self.backbone), {t: _head_module(h) for t, h in self.heads.items()})


@dataclass
class Runner:
    family: Family
    module: nn.Module
    heads: dict[str, nn.Module]

    @torch.inference_mode()
    def predict(self, task: str, batch: dict[str, np.ndarray]) -> np.ndarray:
        device = next(self.module.parameters()).device  # the resident model's device (a store's GPU, or CPU)
        tb = {k: torch.as_tensor(np.ascontiguousarray(v)).to(device) for k, v in batch.items()}
        head = self.heads.get(task)
        if self.family.needs_heads and head is None:
            raise SearchmergeError(f"no head for task `{task}`")
        if head is not None:
            head.to(device)  # in place; a no-op once there
        if getattr(self.family, "heads_from_folders", False):
            return self.family.predict_task(self.module, task, tb).cpu().numpy().astype(np.int64)  # type: ignore[attr-defined]
        return self.family.predict(self.module, head, tb).cpu().numpy().astype(np.int64)


from searchmerge.bench import task_models as _task_models  # noqa: E402,F401  (registers `seqcls_task`)
