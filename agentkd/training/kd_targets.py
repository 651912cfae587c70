"""Sparse KD targets on disk: built in shards (split across processes), streamed by the trainer, and
reused by a resumed run when their inputs did not change. Targets never have to fit in RAM: building
holds one shard's rows at a time, training reads the rows of each batch from memory-mapped files.

    runs/<name>/targets/<iteration>/
        manifest.json     written last: the inputs' fingerprint, the shards in order, per-row values
        shard-00000/      ids.npy (P, k) int32, probs.npy (P, k) float32, tail.npy (P,) float32,
                          offsets.npy (R + 1,) int64 (row r holds positions offsets[r]:offsets[r+1]),
                          rows.npy (R,) int64 (the example index of each row)

Under several processes shard c is built by process c % processes; the main process writes the
manifest after gathering what every process built, and every process then reads every shard.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object

from agentkd.training.objectives import SparseTargets

MANIFEST = "manifest.json"


@dataclass
class ShardPart:
    """What building one shard's rows gives: their targets, one value per row (proxy_kd: the proxy's mean
    log p of y, weighted over ALL rows afterwards), and counts summed over shards (evidence positions)."""

    targets: list[SparseTargets]
    row_values: list[float] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)


BuildShard = Callable[[list[int]], ShardPart]  # example indices -> their targets


def fingerprint(parts: Iterable[Any], models: Iterable[Any] = ()) -> str:
    """A hash of everything the targets depend on: JSON-able parts, and the weights of the model(s) they
    are computed from (a resumed run's q is the same file, so the same bytes)."""
    h = hashlib.blake2b(digest_size=20)
    h.update(json.dumps(list(parts), sort_keys=True, default=str).encode("utf-8"))
    for model in models:
        for name, tensor in sorted(model.state_dict().items()):
            h.update(name.encode("utf-8"))
            h.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class TargetShards:
    """The read side: targets by example index, memory-mapped from the shard files."""

    def __init__(self, folder: Path, manifest: dict[str, Any]) -> None:
        self.folder, self.manifest = Path(folder), manifest
        self._shards = [_open_shard(self.folder / name) for name in manifest["shards"]]
        self._where: dict[int, tuple[int, int]] = {}  # example index -> (shard, row in shard)
        for s, shard in enumerate(self._shards):
            for r, example in enumerate(shard["rows"].tolist()):
                self._where[example] = (s, r)

    @property
    def rows(self) -> list[int]:
        """Example indices with targets, in the order they were built."""
        return list(self.manifest["rows"])

    @property
    def row_values(self) -> list[float]:
        return list(self.manifest["row_values"])

    @property
    def counts(self) -> dict[str, int]:
        return dict(self.manifest["counts"])

    def get(self, example: int) -> SparseTargets | None:
        """The example's targets, read from disk (None: the example has none, e.g. outside the kd role)."""
        found = self._where.get(example)
        if found is None:
            return None
        shard, r = self._shards[found[0]], found[1]
        a, b = int(shard["offsets"][r]), int(shard["offsets"][r + 1])
        return SparseTargets(ids=torch.from_numpy(np.array(shard["ids"][a:b])),
                             probs=torch.from_numpy(np.array(shard["probs"][a:b])),
                             tail=torch.from_numpy(np.array(shard["tail"][a:b])))


def open_if_current(folder: Path, key: str) -> TargetShards | None:
    """The targets in `folder` if they are complete and were built from the inputs hashed as `key`."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        return None
    manifest = json.loads(path.read_text(encoding="utf-8"))
    return TargetShards(folder, manifest) if manifest.get("fingerprint") == key else None


def build_target_shards(folder: Path, key: str, picked: Sequence[int], build: BuildShard,
                        accelerator: Accelerator, *, shard_rows: int) -> tuple[TargetShards, bool]:
    """Targets for the examples `picked` in `folder`: reused when the manifest there has this `key`
    (returns reused=True), else built shard by shard, split across processes. Every process calls it."""
    folder = Path(folder)
    # the main process decides, so every process takes the same branch (and meets the same barriers)
    current = accelerator.is_main_process and open_if_current(folder, key) is not None
    if accelerator.num_processes > 1:
        [current] = broadcast_object_list([current])
    if current:
        return TargetShards(folder, json.loads((folder / MANIFEST).read_text(encoding="utf-8"))), True
    if accelerator.is_main_process:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    accelerator.wait_for_everyone()
    chunks = [list(picked[a : a + shard_rows]) for a in range(0, len(picked), shard_rows)]
    built = []  # (shard number, row values, counts) of the shards this process built
    for c in range(accelerator.process_index, len(chunks), accelerator.num_processes):
        part = build(chunks[c])
        _write_shard(folder / _shard_name(c), chunks[c], part.targets)
        built.append((c, list(part.row_values), dict(part.counts)))
        del part
    everyone = sorted(gather_object(built) if accelerator.num_processes > 1 else built)
    if accelerator.is_main_process:
        counts: dict[str, int] = {}
        for _, _, shard_counts in everyone:
            for name, n in shard_counts.items():
                counts[name] = counts.get(name, 0) + n
        manifest = {"fingerprint": key, "shards": [_shard_name(c) for c, _, _ in everyone],
                    "rows": [i for chunk in chunks for i in chunk],
                    "row_values": [v for _, values, _ in everyone for v in values], "counts": counts}
        tmp = folder / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest) + "\n", encoding="utf-8")
        tmp.rename(folder / MANIFEST)  # last: a folder without it is rebuilt
    accelerator.wait_for_everyone()
    manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    return TargetShards(folder, manifest), False


def _shard_name(number: int) -> str:
    return f"shard-{number:05d}"


def _write_shard(path: Path, rows: list[int], targets: Sequence[SparseTargets]) -> None:
    """One shard's files, written to a temp folder and renamed into place."""
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    width = max((t.ids.size(-1) for t in targets), default=1)  # rows may differ in width: zero mass pads
    lengths = [t.ids.size(0) for t in targets]
    ids = np.zeros((sum(lengths), width), np.int32)
    probs = np.zeros((sum(lengths), width), np.float32)
    tail = np.zeros(sum(lengths), np.float32)
    at = 0
    for t, n in zip(targets, lengths, strict=True):
        w = t.ids.size(-1)
        ids[at : at + n, :w], probs[at : at + n, :w], tail[at : at + n] = t.ids, t.probs, t.tail
        at += n
    np.save(tmp / "ids.npy", ids)
    np.save(tmp / "probs.npy", probs)
    np.save(tmp / "tail.npy", tail)
    np.save(tmp / "offsets.npy", np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64))
    np.save(tmp / "rows.npy", np.asarray(rows, np.int64))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def _open_shard(path: Path) -> dict[str, np.ndarray]:
    return {name: np.load(path / f"{name}.npy", mmap_mode="r") for name in ("ids", "probs", "tail", "offsets", "rows")}


class KDRows(Sequence):
    """Training rows (encoded, targets) or, with per-row weights, (encoded, targets, weight), the targets
    looked up when a batch asks for them: `targets_of` is a dict's get (in memory) or TargetShards.get
    (read from disk). Rows without targets get None (NLL only)."""

    def __init__(self, encoded: Sequence[Any], targets_of: Callable[[int], SparseTargets | None],
                 weights: Sequence[float] | None = None) -> None:
        self.encoded, self.targets_of, self.weights = encoded, targets_of, weights

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, i: int) -> tuple:  # type: ignore[override]
        row = (self.encoded[i], self.targets_of(i))
        return row if self.weights is None else (*row, self.weights[i])
