"""What a teacher backend provides: the `TeacherBackend` Protocol and the records it hands over.

A backend is one family of ViTs hdpipe reads targets from (timm, open_clip, a run's student). It is
a small stateless object registered once in `pipeline.targets.specs.BACKENDS` under the prefix of
its specs (`timm:NAME` -> `BACKENDS["timm"]`); `load_teacher` and `Teacher` use nothing else of it.
Its jobs, in the order `load_teacher` asks:

    parse          "PREFIX:REST" -> TeacherSpec, by name only (nothing built, nothing read)
    pretrained     the model with the weights the spec names (hub tag, a student's export) + source
    create         the model freshly initialized (the caller seeds it: --random-init, --checkpoint)
    load_state     a local checkpoint's state dict into that model (library key layouts converted)
    preprocessing  the mean, std and resize filter the weights were trained with
    geometry       checks the model is a ViT whose Q·Kᵀ can be read; depth, heads, dims, grid, img_size
    hook_qk        a forward hook handing (q, k) [B, H, N, hd] of one block to a sink
    final_tokens   one forward: every token after the model's final norm, [B, N, D] (CLIP: ln_post)

Tokens are N = 1 + patches with the CLS token first; q and k are what the block's attention softmax
sees (after any q/k norm), before the 1/sqrt(head_dim) scale. The common flow around `pretrained`,
`create` and `load_state` (seeded random init, checkpoint files, source strings) is
`pipeline.targets.weights.build_weights`, so every backend reads checkpoints the same way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch
    from torch import nn
    from torch.utils.hooks import RemovableHandle

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_DATASET_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip.constants, CLIP's training set
OPENAI_DATASET_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class TeacherSpec:
    """What to build and how to feed it."""

    name: str  # canonical spec string recorded in stores, e.g. "mae" or "timm:vit_small_patch16_224"
    backend: str  # the BACKENDS key that builds it: "timm" | "open_clip" | "student" | ...
    model: str  # timm model name (with .tag) / open_clip config name / student directory
    tag: str | None  # open_clip pretrained tag (timm keeps its tag inside `model`)
    role: str  # "mim" (relations + masks) or "disc" (features) by default for this teacher
    mean: tuple[float, float, float]  # per-channel normalization mean, inputs in [0, 1]
    std: tuple[float, float, float]  # per-channel normalization std
    interpolation: str  # resize filter of this teacher's preprocessing


@dataclass(frozen=True)
class Preprocessing:
    """The input pipeline a teacher's weights were trained with (the view size is the model's img_size)."""

    mean: tuple[float, float, float]  # per-channel normalization mean, inputs in [0, 1]
    std: tuple[float, float, float]  # per-channel normalization std
    interpolation: str  # resize filter: "bicubic" | "bilinear" | ...


@dataclass(frozen=True)
class ViTGeometry:
    """A checked ViT's shape, and the blocks whose inputs and outputs hdpipe hooks."""

    blocks: tuple  # the transformer blocks in order (nn.Module each); depth = len(blocks)
    num_heads: int  # attention heads per block
    head_dim: int  # channels per head (q and k are [B, H, N, head_dim])
    embed_dim: int  # token width D
    grid: tuple[int, int]  # patch grid (rows, cols); N = 1 + rows * cols
    img_size: tuple[int, int]  # input (height, width) the model was built for
    seq_first: bool = False  # blocks take and give [N, B, D] (open_clip without batch_first), else [B, N, D]


# sink(layer, q, k): receives one block's q and k, each [B, H, N, head_dim]; layer is 1-based.
QKSink = Callable[[int, "torch.Tensor", "torch.Tensor"], None]


@runtime_checkable
class TeacherBackend(Protocol):
    """One family of ViT teachers (module docstring). Stateless: every method takes what it works on."""

    forms: str  # the spec forms it answers to, listed in errors: "timm:NAME"

    def parse(self, spec: str, rest: str) -> TeacherSpec:
        """`spec` = "PREFIX:REST" checked by name against the library's registry (nothing built or read):
        the model, tag, default role and the published weights' preprocessing. ConfigError when unknown."""

    def pretrained(self, spec: TeacherSpec, model_kwargs: dict) -> tuple[nn.Module, str]:
        """The model with the weights `spec` names and their source ("pretrained:timm/NAME", ...).
        Unreachable hub: an HdpipeError naming --checkpoint PATH and --random-init."""

    def create(self, spec: TeacherSpec, model_kwargs: dict) -> nn.Module:
        """The model freshly initialized, from the torch RNG the caller seeded (random init, and the
        model a local checkpoint is loaded into). Rejected kwargs: `weights.create_with_kwargs`' ConfigError."""

    def load_state(self, model: nn.Module, state: dict, source: str) -> None:
        """Put a local checkpoint's flat {key: tensor} (MAE decoder keys already dropped) into `model`,
        converting the library's other key layouts; a missing or unexpected key is an error naming it."""

    def preprocessing(self, spec: TeacherSpec) -> Preprocessing:
        """Mean, std and resize filter of the weights (the spec's; a student's from its config.json)."""

    def geometry(self, model: nn.Module, name: str) -> ViTGeometry:
        """Check `model` is a ViT hdpipe can read (one CLS token and no registers, a final norm over every
        token, q and k reachable in every block), else a ConfigError naming `name`; return its shape."""

    def hook_qk(self, model: nn.Module, layer: int, sink: QKSink) -> RemovableHandle:
        """Register a forward hook that calls sink(layer, q, k) for block `layer` (1-based)."""

    def final_tokens(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Forward a normalized batch [B, 3, S, S]; every token after the final norm, [B, N, D]."""
