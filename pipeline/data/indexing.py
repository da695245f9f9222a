"""Indexing existing webdataset tars (`hdpipe shard --urls`): counts, sha256, labels, class map.

Each tar is read once, streamed: samples are grouped by webdataset's key rule, hashed as they pass,
and their labels taken from `.cls` (or the `label` of `.json`). Indices are by position: the tars
in the given order, samples in tar order. Class names come from the samples when consistent (the
ImageNet webdataset layout: keys n01440764_10026, `.json` filename "n01440764/...").
"""
from __future__ import annotations

import array
import hashlib
import os
import re
from dataclasses import dataclass

import numpy as np

from pipeline.errors import ShardError
from pipeline.urls import fs_and_path

NO_LABEL = -1  # TarIndex.labels of a sample without one (labels are >= 0)


def expand_urls(spec: str) -> list[str]:
    """URLs from a list file (one per line, '#' comments) or a brace pattern like x-{000000..000003}.tar."""
    import braceexpand

    if "{" in spec or "://" in spec or spec.endswith(".tar"):
        urls = list(braceexpand.braceexpand(spec))
    elif os.path.isfile(spec):
        with open(spec) as f:
            lines = [ln.strip() for ln in f if ln.strip() and not ln.strip().startswith("#")]
        if not lines:
            raise ShardError(f"URL list {spec} is empty")
        urls = [u for ln in lines for u in braceexpand.braceexpand(ln)]
    else:
        raise ShardError(f"--urls {spec}: no such list file, and not a tar URL or brace pattern "
                         "(e.g. 'data/x-{000000..000003}.tar')")
    return [u if "://" in u else os.path.abspath(u) for u in urls]


@dataclass
class TarIndex:
    """What indexing one tar learns in its single streamed read."""

    count: int  # samples (webdataset key groups)
    sha256: str  # hex digest of the whole file
    # The class labels (.cls, or the .json's "label") its samples use, sorted: what the class map
    # needs, held per tar, not per sample (the labels of every sample had cost 4 bytes each, and 12.7
    # per sample at the class map's peak: +16 MB, 1.33x `shard --urls`' RSS at ImageNet's 1.28 M)
    present: np.ndarray  # int32 [distinct labels]
    unlabeled: int  # position of its first sample without a label, or -1 when every sample has one
    names: dict  # {label: class names seen for it}: .json class_name/wnid, the first folder of .json
                 # filename/name, or the key's prefix before "_" (ImageNet keys: n01440764_10026)


def _class_names(sample: dict, meta: dict) -> list[str]:
    out = [str(meta[k]) for k in ("class_name", "wnid", "synset") if isinstance(meta.get(k), str) and meta[k]]
    for k in ("filename", "name"):
        path = meta.get(k)
        if isinstance(path, str) and "/" in path.strip("/"):
            out.append(path.strip("/").split("/")[0])
    key = os.path.basename(sample["__key__"])
    if re.fullmatch(r"[A-Za-z]+\d*_\d+", key):
        out.append(key.rsplit("_", 1)[0])
    return out[:1]


def index_tar(url: str) -> TarIndex:
    """Samples in a tar (webdataset key grouping), their labels and its sha256, in one streamed read."""
    import json

    from pipeline.data.images import IMAGE_EXTS
    from pipeline.data.reading import sample_label, tar_samples

    fs, path = fs_and_path(url)
    if not fs.exists(path):
        raise ShardError(f"tar {url} does not exist")
    h = hashlib.sha256()

    class _Tee:
        def __init__(self, f):
            self.f = f

        def read(self, n=-1):
            b = self.f.read(n)
            h.update(b)
            return b

    labels = array.array("i")
    names: dict = {}
    try:
        with fs.open(path, "rb") as f:
            tee = _Tee(f)
            for sample in tar_samples(tee, url):
                if not any(ext in sample for ext in IMAGE_EXTS):
                    raise ShardError(f"tar {url}: sample {sample['__key__']} has no image member")
                try:
                    meta = json.loads(sample["json"]) if "json" in sample else {}
                except (UnicodeDecodeError, json.JSONDecodeError):
                    meta = {}
                meta = meta if isinstance(meta, dict) else {}
                label = sample_label(sample, meta, url)
                if label is not None and label < 0:
                    raise ShardError(f"tar {url}: sample {sample['__key__']} has a negative class label {label}")
                if label is not None and label >= 2**31:
                    raise ShardError(f"tar {url}: sample {sample['__key__']} has a class label {label} >= 2**31")
                labels.append(NO_LABEL if label is None else label)
                seen = _class_names(sample, meta) if label is not None else []
                if seen:  # no empty set per label: a tar of unnamed samples holds no names at all
                    names.setdefault(label, set()).update(seen)
            while tee.read(1 << 20):  # hash the end-of-archive padding the tar reader did not consume
                pass
    except PermissionError:
        raise ShardError(f"tar {url} is not readable (permission denied)") from None
    labels_of = np.frombuffer(labels, dtype=np.int32)
    missing = np.flatnonzero(labels_of == NO_LABEL)
    return TarIndex(len(labels_of), h.hexdigest(), np.unique(labels_of[labels_of != NO_LABEL]),
                    int(missing[0]) if len(missing) else -1, names)


def merge_names(into: dict[int, set], names: dict[int, set]) -> None:
    """Add one tar's {label: class names seen} to the dataset's."""
    for label, seen in names.items():
        into.setdefault(label, set()).update(seen)


def class_map_of(indexed: list[TarIndex], urls: list[str], names: dict[int, set],
                 present: np.ndarray | None = None) -> dict[str, int] | None:
    """{class name: label} from the tars' labels (None when no sample has one) and `names` {label:
    class names seen}, merged over the tars while indexing (`merge_names`): kept per tar they would
    hold a set per class and tar, 1,252 x 1,000 of them for ImageNet.

    `present`: the labels the tars use, when merged while indexing (None: from each tar's `present`).
    Labels must be on every sample or on none. Names come from the samples (`_class_names`) when
    each label has exactly one and no two labels share one; otherwise the label's decimal string.
    Labels absent from these tars (a subset of a larger label set) still get an entry, so the
    map covers 0..max label as a manifest requires.
    """
    if present is None:
        present = np.unique(np.concatenate([t.present for t in indexed]))
    if not len(present):
        return None
    for t, url in zip(indexed, urls):
        if t.unlabeled >= 0:
            raise ShardError(f"tar {url}: sample {t.unlabeled} has no class label (.cls or "
                             "a .json 'label') while others have one; label every sample or none")
    present = set(np.asarray(present).tolist())
    top = max(present)
    chosen = {label: next(iter(names[label])) for label in present if len(names.get(label, ())) == 1}
    if len(chosen) != len(present) or len(set(chosen.values())) != len(chosen):
        chosen = {}  # no consistent names: every class is called by its label
    chosen = {label: chosen.get(label, str(label)) for label in range(top + 1)}
    if len(set(chosen.values())) != len(chosen):
        chosen = {label: str(label) for label in range(top + 1)}
    return {name: label for label, name in chosen.items()}
