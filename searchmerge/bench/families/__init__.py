"""Architecture families: how a folder loads, how inputs are preprocessed, how a backbone + head predicts.

* ``seqcls_task`` (:mod:`.task`) — standard ``AutoModelForSequenceClassification`` folders: the backbone
  under ``base_model_prefix`` is merged, each task's own head runs in the architecture's own forward.
* ``image_task`` (:mod:`.task`) — the same for ``AutoModelForImageClassification`` folders (ViT, ConvNeXt, ...).
* ``seqcls`` (:mod:`.hf`) — an encoder (``AutoModel``) with mean pooling and one linear head per task from
  separate head files (an explicit choice, not what standard classification checkpoints do).
* ``causal_lm_mc`` (:mod:`.hf`) — a causal LM answering multiple choice by the summed log-likelihood of
  each answer's tokens; no heads.
* ``image`` (:mod:`.mobilenet`) — the project's MobileNetV2 (torchvision-compatible) + per-task linear heads.
* ``mlp`` (:mod:`.mlp`) — a plain MLP trunk on feature vectors + per-task heads (the fixture zoo).
* ``clip`` (:mod:`.clip`) — a CLIP folder; vision tower + visual projection merged, zero-shot text heads.

:mod:`.base` holds the registry and the :class:`Family` interface, :mod:`.pixels` the image preprocessing,
:mod:`.model` the picklable :class:`BenchModel` bundle and its :class:`Runner` (evaluated in-process or on
Ray actors). Importing this package registers every family.
"""

from searchmerge.bench.families.base import (  # noqa: F401
    FAMILIES, MAX_TOKENS, Family, _head_module, _load_project_folder, _load_safetensors_folder, _register,
    get_family,
)
from searchmerge.bench.families.pixels import (  # noqa: F401
    CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, _image_chw, clip_images_to_tensor, images_to_tensor,
    processor_pixels,
)
from searchmerge.bench.families.mlp import MLPFamily, MLPTrunk  # noqa: F401
from searchmerge.bench.families.mobilenet import (  # noqa: F401
    ConvBNReLU, ImageFamily, InvertedResidual, MobileNetV2, MobileNetV2Backbone, _div,
)
from searchmerge.bench.families.hf import (  # noqa: F401
    CausalMCFamily, SeqClsFamily, TransformersFamily, _config_from_dict, _tokenizer,
)
from searchmerge.bench.families.clip import (  # noqa: F401
    _ZERO_SHOT, DEFAULT_TEMPLATES, ZERO_SHOT_CACHE_DIR, ZERO_SHOT_STATS, CLIPFamily, _folder_fingerprint,
    _format_prompt, clip_zero_shot_heads, compute_text_heads, zero_shot_key,
)
from searchmerge.bench.families.task import (  # noqa: F401
    ImageTaskFamily, SeqClsTaskFamily, TaskModelFamily, TaskModelRunner, load_task_model, split_task_model,
)
from searchmerge.bench.families.model import BenchModel, Runner  # noqa: F401
