"""The study's cache: per model ``spec.json`` (what it was trained with) and ``measures.json``
(every value computed, keyed by everything it depends on)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from samkit.config import TrainConfig, resolved_dict, to_dict, upgrade_keys
from samkit.experiments.correlate.config import CorrelateConfig
from samkit.experiments.correlate.grid import ModelSpec
from samkit.train.checkpoint import atomic_write_text


class MeasureCache:
    """``measures.json`` of one model: ``{cache key: {"value": v, "time": s}}``, rewritten
    atomically after every new entry (so a kill loses at most the measure in progress)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.entries: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            self.entries = json.loads(self.path.read_text())
        self.computed = 0  # entries computed (not read) by this object

    def get(self, key: str, compute: Callable[[], Any]) -> Any:
        if key not in self.entries:
            t0 = time.perf_counter()
            value = compute()
            self.entries[key] = {"value": value, "time": time.perf_counter() - t0}
            atomic_write_text(self.path, json.dumps(self.entries, indent=1, sort_keys=True))
            self.computed += 1
        return self.entries[key]["value"]



def _spec_record(spec: ModelSpec, config: CorrelateConfig) -> dict[str, Any]:
    return {"hparams": spec.hparams, "train": resolved_dict(spec.train),
            "stop_loss": config.stop_loss}


def _spec_changes(saved: dict[str, Any], record: dict[str, Any]) -> list[str]:
    """The settings in which a cached model's ``spec.json`` differs from ``record``. A training
    key the cache does not know (added to TrainConfig since) counts only if it is not at its
    default; a key the cache has and TrainConfig no longer has is ignored."""
    record = json.loads(json.dumps(record))
    defaults = json.loads(json.dumps(to_dict(TrainConfig())))
    old = upgrade_keys(saved.get("train", {}), TrainConfig, "cached spec")
    changed = sorted(
        k for k, v in record["train"].items()
        if (old[k] != v if k in old else defaults.get(k) != v)
    )
    changed += [k for k in ("hparams", "stop_loss") if saved.get(k) != record[k]]
    return changed
