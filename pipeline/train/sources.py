"""What the target stores of a stage-two run serve, checked once: `resolve_sources`.

The one owner of the checks between a manifest, a MIM store, a discriminative store and what a
run asks for (masking, relation layers, MIM target): complete stores, the same manifest, stores
that agree with each other (view plan, token set, grid, masks, MIM weights), and the arrays the run
needs. Distill calls it before building the student; the loader calls it again (cached). No
teacher is built: everything comes from the stores' attributes and array shapes.
"""
from __future__ import annotations

import functools
import os
import posixpath
from dataclasses import dataclass

import numpy as np

from pipeline.errors import StoreError
from pipeline.targets.layout import MIM_TARGETS
from pipeline.urls import sibling


@dataclass(frozen=True)
class TeacherShapes:
    """What the teachers give, whoever serves it (the stores, or the teachers themselves online): the
    shapes a student is built to match (`stages.distill.build_student`)."""

    grid: tuple[int, int]  # teacher patch grid (rows, cols)
    relation_layers: tuple[int, ...]  # MIM teacher blocks (1-based) served; () = none
    mim_depth: int | None  # MIM teacher depth L_t and head count (the student's layer and head rules)
    mim_heads: int | None
    mim_dim: int | None  # MIM teacher width (block_features targets)
    feature_dim: int | None  # discriminative teacher width (features targets); None: no feature term


@dataclass(frozen=True)
class Sources:
    """What the stores serve, checked once (`resolve_sources`): where views, masks and targets come
    from, the token geometry, and the teacher shapes a student must match. No teacher is built."""

    view_store: str  # URL of the MIM store whose `views` / `keep_*` arrays are replayed
    mim_store: str | None  # URL of the MIM targets' store (None: no MIM term)
    disc_store: str | None  # URL of the features' store (None: no feature term)
    tokens: str  # "kept" | "all": the stores' token set
    grid: tuple[int, int]  # teacher patch grid (rows, cols)
    num_patches: int  # P: patch tokens of the teacher grid
    n_keep: int  # kept patches per view (from the stored masks)
    num_views: int  # V stored views per sample
    relation_layers: tuple[int, ...]  # MIM teacher blocks (1-based) served, in batch order; () = none
    layer_pos: tuple[int, ...]  # positions of `relation_layers` in the MIM store's layer axis
    mim_array: str | None  # MIM store array served (relations|attention|block_features), None without MIM targets
    mim_depth: int | None  # MIM teacher depth L_t and head count (for the student's layer and head rules)
    mim_heads: int | None
    mim_dim: int | None  # MIM teacher width (block_features targets)
    feature_dim: int | None  # discriminative teacher width (features targets)
    valid_stores: tuple[str, ...]  # stores whose `valid` rows are ANDed

    def shapes(self) -> TeacherShapes:
        return TeacherShapes(grid=self.grid, relation_layers=self.relation_layers, mim_depth=self.mim_depth,
                             mim_heads=self.mim_heads, mim_dim=self.mim_dim, feature_dim=self.feature_dim)


def _open_store(url: str):
    from pipeline.targets.store import TargetStore

    return TargetStore.open(url)  # fresh: the checks see the stores as they are now


def _after(commands: list[str], options: str) -> str:
    """`a`, then `b`, ... then run with OPTIONS: one sentence a user can follow step by step."""
    return ", then ".join(f"`{c}`" for c in commands) + f", then run with {options}"


def resolve_sources(manifest_path: str, mim_store: str | None, disc_store: str | None,
                    masking: str = "progressive", relation_layers: tuple[int, ...] | None = None,
                    mim_target: str = "relations") -> Sources:
    """Open the stores and check them against the manifest, each other and what the run asks for.

    Every refusal is one StoreError naming the field; the fix-it commands come from
    `pipeline.targets.hints` and never rebuild a store in place (stage two made none of them): a store with
    other settings is written beside the old one and the run pointed at it. Not cached: the stores may
    change between two calls (a shard finished, rebuilt or damaged), and the checks must see them as
    they are (one call per epoch's loader costs a few small reads).
    """
    from pipeline.targets.hints import extract_command
    from pipeline.data.manifest import read_manifest

    manifest = read_manifest(manifest_path)
    digest = manifest.digest()
    mim_url = mim_store
    if mim_url is None and disc_store is not None:
        # Views and masks always come from a MIM store: a features-only run (CLIP-only ablation)
        # replays the one the disc store was built against (recorded in its attributes).
        mim_url = _open_store(disc_store).attrs.get("mim_store")
        if mim_url is None:
            raise StoreError(f"disc_store {disc_store} does not record its mim_store; set mim_store")
    opened = {}
    for role, url in (("mim_store", mim_url), ("disc_store", disc_store)):
        if url is None:
            continue
        store = _open_store(url)
        want_role = "mim" if role == "mim_store" else "disc"
        got_role = store.attrs.get("role", want_role)
        if got_role != want_role:
            raise StoreError(f"{role} {url} is a {got_role!r} store (teacher {store.attrs.get('teacher')}); "
                             f"{role} needs a {want_role!r} one")
        got = store.attrs.get("manifest_digest")
        if got != digest:
            if role == "mim_store":  # a new MIM store for this manifest, and a disc store against it
                new_mim = sibling(url, manifest.name)
                steps = [extract_command(store.attrs, manifest=manifest_path, out=new_mim)]
                options = f"--mim-store {new_mim}"
                if disc_store is not None:
                    new_disc = sibling(disc_store, manifest.name)
                    steps.append(extract_command(_open_store(disc_store).attrs, manifest=manifest_path,
                                                 out=new_disc, mim_store=new_mim))
                    options += f" --disc-store {new_disc}"
            else:  # the MIM store fits: a disc store for this manifest against it
                new_disc = sibling(url, manifest.name)
                steps = [extract_command(store.attrs, manifest=manifest_path, out=new_disc, mim_store=mim_url)]
                options = f"--disc-store {new_disc}"
            raise StoreError(
                f"{role} {url} was built from another manifest: manifest_digest {got!r} != {digest!r} of "
                f"{manifest_path}; pass the manifest it was built from, or make stores for this one: "
                + _after(steps, options))
        store.require_complete(extract_command(store.attrs, manifest=manifest_path, out=url))
        opened[role] = store
    mim, disc = opened["mim_store"], opened.get("disc_store")
    if disc is not None:
        pairs = [(k, k) for k in ("view_plan_digest", "tokens", "grid", "mask")]
        pairs.append(("weights_digest", "mim_weights_digest"))  # masks come from the MIM teacher's weights
        for mim_key, disc_key in pairs:
            a, b = mim.attrs.get(mim_key), disc.attrs.get(disc_key)
            if a != b:
                fresh = sibling(disc_store, "for-" + posixpath.basename(mim_url.rstrip("/"))[:-5])
                raise StoreError(
                    f"stores disagree on {disc_key}: mim_store {mim_url} has {a!r}, disc_store {disc_store} has "
                    f"{b!r}; make a disc store against this MIM store: "
                    + _after([extract_command(disc.attrs, manifest=manifest_path, out=fresh, mim_store=mim_url)],
                             f"--disc-store {fresh}"))
    attrs = mim.attrs
    tokens = str(attrs.get("tokens"))
    if tokens not in ("kept", "all"):
        raise StoreError(f"mim_store {mim_url} has token set {tokens!r}; expected 'kept' or 'all'")
    if tokens == "kept" and masking != "progressive":
        new_mim = sibling(mim_url, "tokens-all")
        steps = [extract_command(attrs, manifest=manifest_path, out=new_mim, tokens="all")]
        options = f"--mim-store {new_mim}"
        if disc is not None:
            new_disc = sibling(disc_store, "tokens-all")
            steps.append(extract_command(disc.attrs, manifest=manifest_path, out=new_disc, mim_store=new_mim))
            options += f" --disc-store {new_disc}"
        raise StoreError(
            f"masking {masking!r} needs targets for every token, but {mim_url} holds only the progressive-kept "
            f"tokens (tokens: kept); make stores of every token: " + _after(steps, options))
    grid = tuple(int(g) for g in attrs.get("grid"))
    stored = tuple(int(x) for x in attrs.get("relation_layers", ()))
    asked: tuple[int, ...] = ()
    layer_pos: tuple[int, ...] = ()
    mim_array = None
    if mim_store is not None:
        asked = stored if relation_layers is None else tuple(relation_layers)
        missing = [layer for layer in asked if layer not in stored]
        if missing:
            want = sorted(set(stored) | set(asked))
            fresh = sibling(mim_url, "layers-" + "-".join(map(str, want)))
            raise StoreError(
                f"relation layers {missing} are not in mim_store {mim_url} (it holds {list(stored)}); make a MIM "
                "store with them (the disc store stays valid): "
                + _after([extract_command(attrs, manifest=manifest_path, out=fresh, relation_layers=want)],
                         f"--mim-store {fresh}"))
        layer_pos = tuple(stored.index(layer) for layer in asked)
        if asked:
            have = set(MIM_TARGETS) & set(mim.arrays)
            if mim_target not in have:
                extras = sorted((have - {"relations"}) | {mim_target})
                fresh = sibling(mim_url, "-".join(extras))
                raise StoreError(
                    f"mim_target {mim_target!r} is not stored in {mim_url} (it holds {sorted(have)}); make a MIM "
                    "store with it (the disc store stays valid): "
                    + _after([extract_command(attrs, manifest=manifest_path, out=fresh, extra_targets=extras)],
                             f"--mim-store {fresh}"))
            mim_array = mim_target
    mim_dim = int(mim.arrays["block_features"].shape_tail[-1]) if "block_features" in mim.arrays else None
    return Sources(
        view_store=mim_url, mim_store=mim_store, disc_store=disc_store, tokens=tokens, grid=grid,
        num_patches=int(np.prod(grid)), n_keep=int(attrs["mask"]["n_keep"]),
        num_views=int(attrs["view_plan"]["views"]), relation_layers=asked, layer_pos=layer_pos,
        mim_array=mim_array, mim_depth=int(attrs["depth"]), mim_heads=int(attrs["num_heads"]), mim_dim=mim_dim,
        feature_dim=None if disc is None else int(disc.arrays["features"].shape_tail[-1]),
        valid_stores=tuple(u for u in (mim_url, disc_store) if u is not None),
    )


def open_store(url: str):
    """The store at `url`, opened once per process: a forked DataLoader worker opens its own
    rather than reuse the parent's handles (fsspec/zarr I/O state is not fork-safe for remote URLs)."""
    return _store_in(url, os.getpid())


@functools.lru_cache(maxsize=16)
def _store_in(url: str, pid: int):
    return _open_store(url)
