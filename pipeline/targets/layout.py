"""What a target store holds: its `hdpipe` attributes and arrays, for a MIM or a discriminative teacher.

MIM store (N samples, V views, T stored tokens, L relation layers, H heads, D width):
    views             float32 [N, V, 5]        crop box (x0, y0, x1, y1) and flip of each view
    keep_progressive  int16   [N, V, n_keep]   progressive redundant token masking (paper §3.2)
    keep_direct       int16   [N, V, n_keep]   the same rule once, at the last block (Tab. 8)
    relations         [N, V, L, H, T, T]       raw Q·Kᵀ per head, no 1/√d (the store's precision)
    attention         [N, V, L, H, T, T]       optional: softmax(R·d^-0.5) over the stored tokens
    block_features    [N, V, L, T, D]          optional: block outputs at the relation layers
    student_pixels    uint8 [N, V, K, 3, p, p] optional: the student's view at the stored tokens' patches
                                               (K = T - 1; `pipeline.targets.pixels`)
Discriminative store:
    features          [N, V, T, D]             final-layer tokens after the final norm, raw
Both: `valid` bool [N] (false for samples skipped as unreadable).

The attributes are what a resumed run must match exactly (`TargetStore.create` compares them), so
they hold every setting that changes a stored value and nothing that does not (batch size,
workers, device). The store adds the manifest digest, counts and its package version.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, get_args

from pipeline.errors import ConfigError

if TYPE_CHECKING:
    from pipeline.data.views import ViewPlan
    from pipeline.targets.pixels import StudentPixels
    from pipeline.targets.schema import ArraySpec
    from pipeline.targets.teachers import Teacher, TeacherSource

MimTarget = Literal["relations", "attention", "block_features"]  # what a student imitates of the MIM teacher
MIM_TARGETS = get_args(MimTarget)
EXTRA_TARGETS = MIM_TARGETS[1:]  # stored besides relations on request (paper Tab. 5-6)
EXTRACT_FORMAT = 1  # bumped when the arrays or attributes extraction writes change meaning


def resolve_layers(layers: tuple[int, ...], depth: int) -> tuple[int, ...]:
    """Relation layers as 1-based block numbers; values <= 0 count back from the last block L."""
    out = tuple(int(b) if b > 0 else depth + int(b) for b in layers)
    bad = [b for b, r in zip(layers, out) if not 1 <= r <= depth]
    if bad:
        raise ConfigError(f"relation_layers {list(bad)} fall outside blocks 1..{depth} of this teacher")
    return tuple(sorted(out))


def _common(teacher: "Teacher", source: "TeacherSource", role: str, tokens: str, precision: str) -> dict[str, Any]:
    gh, gw = teacher.grid
    return {
        "extract_format": EXTRACT_FORMAT,
        "teacher": source.name,
        "role": role,
        "checkpoint": source.checkpoint,
        "random_init": source.random_init,
        "model_kwargs": dict(sorted(source.model_kwargs.items())),
        "weights_source": teacher.weights_source,
        "weights_digest": teacher.weights_digest,
        "preprocessing": teacher.preprocessing,
        "preprocessing_override": source.overrides(),
        "depth": teacher.depth, "num_heads": teacher.num_heads, "head_dim": teacher.head_dim,
        "embed_dim": teacher.embed_dim, "grid": [gh, gw],
        "tokens": tokens,
        "precision": precision,
        "valid": "valid [N] bool: false for samples skipped as unreadable (listed in their shard's done marker)",
    }


def mim_layout(teacher: "Teacher", source: "TeacherSource", *, plan: "ViewPlan", relation_layers: tuple[int, ...],
               extra_targets: tuple[str, ...], mask_ratio: float, tokens: str, precision: str,
               student_pixels: "StudentPixels | None" = None) -> tuple[dict, dict[str, "ArraySpec"]]:
    """(attributes, arrays) of a MIM store; `relation_layers` resolved 1-based blocks. With
    `student_pixels`, the store also holds each view's student input at its stored tokens' patches."""
    from pipeline.targets.masking import kept_count, mask_layers
    from pipeline.targets.schema import ArraySpec

    patches = teacher.grid[0] * teacher.grid[1]
    n_keep = int(kept_count(patches, mask_ratio))
    T = 1 + (n_keep if tokens == "kept" else patches)
    attrs = _common(teacher, source, "mim", tokens, precision)
    attrs.update({
        "view_plan": plan.to_attrs(), "view_plan_digest": plan.digest(),
        "relation_layers": list(relation_layers),
        "relation_scale": "none: raw Q·Kᵀ per head; logits = R * head_dim**-0.5",
        "mask": {"rule": "progressive", "ratio": mask_ratio, "layers": list(mask_layers(teacher.depth)),
                 "direct_layer": teacher.depth, "n_keep": n_keep},
        "extra_targets": sorted(extra_targets),
    })
    nl, H, D = len(relation_layers), teacher.num_heads, teacher.embed_dim
    arrays = {"views": ArraySpec((5,), "float32"),
              "keep_progressive": ArraySpec((n_keep,), "int16"),
              "keep_direct": ArraySpec((n_keep,), "int16"),
              "relations": ArraySpec((nl, H, T, T), "float32", precision)}
    if "attention" in extra_targets:
        arrays["attention"] = ArraySpec((nl, H, T, T), "float32", precision)
    if "block_features" in extra_targets:
        arrays["block_features"] = ArraySpec((nl, T, D), "float32", precision)
    if student_pixels is not None:  # absent otherwise: stores without pixels keep their attributes
        attrs["student_pixels"] = student_pixels.to_attrs()
        arrays["student_pixels"] = student_pixels.spec(T - 1)
    arrays["valid"] = ArraySpec((), "bool", per_view=False)
    return attrs, arrays


def disc_layout(teacher: "Teacher", source: "TeacherSource", *, mim_attrs: dict, mim_store: str,
                precision: str) -> tuple[dict, dict[str, "ArraySpec"]]:
    """(attributes, arrays) of a discriminative store over the views and tokens of a MIM store."""
    from pipeline.targets.schema import ArraySpec

    gh, gw = teacher.grid
    mim_grid = list(mim_attrs["grid"])
    if mim_grid != [gh, gw]:
        raise ConfigError(
            f"teacher {source.name} has a {gh}x{gw} patch grid but the MIM store {mim_store} has "
            f"{mim_grid[0]}x{mim_grid[1]}: patch token i must mean the same region for both; pick a teacher "
            "with the same grid (model_kwargs img_size/patch_size)"
        )
    tokens = mim_attrs["tokens"]
    T = 1 + (int(mim_attrs["mask"]["n_keep"]) if tokens == "kept" else gh * gw)
    attrs = _common(teacher, source, "disc", tokens, precision)
    attrs.update({
        "view_plan": mim_attrs["view_plan"], "view_plan_digest": mim_attrs["view_plan_digest"],
        "mim_store": mim_store, "mim_weights_digest": mim_attrs["weights_digest"],
        "mask": mim_attrs["mask"],
        "features": "final-layer tokens after the model's final norm, raw (whiten at load time)",
    })
    # q1pct predicts features from a channel subspace of the store (fp16 and int8 ignore it).
    arrays = {"features": ArraySpec((T, teacher.embed_dim), "float32", precision, channel_basis=True),
              "valid": ArraySpec((), "bool", per_view=False)}
    return attrs, arrays
