"""The one place the runner loads its data: ``samkit train``, ``compare``, ``correlate`` and
``eos`` all call :func:`load_data` (the Trainer with its config's data section).

Image and tabular sets come from :func:`samkit.data.load_dataset` (subset and label noise
seeded by ``data_seed``) and are either standardized (mean and std per feature) or centred
(pixels in [0, 1] minus the per-pixel training mean: Long & Bartlett's); a text file is a
character-level language-modelling set (:func:`samkit.data.load_text`).
"""

from __future__ import annotations

from typing import Any

PREPROCESS = ("standardize", "center")

_CACHE: dict[tuple, Any] = {}


def load_data(dataset: str, *, data_dir: str | None = None, subset: int | None = None,
              stratified: bool = True, label_noise: float = 0.0, data_seed: int = 0,
              preprocess: str = "standardize", text: str | None = None, seq_len: int = 64,
              device: Any = "cpu", cache: bool = False) -> tuple[Any, Any]:
    """The ``(train, test)`` splits, held on ``device``; with ``cache``, loaded once per
    process (the last one is kept)."""
    from samkit.data import load_dataset, load_text

    if preprocess not in PREPROCESS:
        raise ValueError(f"Invalid preprocess: {preprocess!r} (allowed: {', '.join(PREPROCESS)})")
    key = (dataset, data_dir, subset, stratified, label_noise, data_seed, preprocess, text,
           seq_len, str(device))
    if cache and key in _CACHE:
        return _CACHE[key]
    if text is not None:
        data = load_text(text, seq_len, device=device)
    else:
        data = load_dataset(
            dataset, data_dir=data_dir, subset=subset, stratified=stratified,
            label_noise=label_noise, seed=data_seed, standardize=preprocess == "standardize",
            device=device,
        )
        if preprocess == "center":  # pixels in [0, 1] minus the per-pixel training mean
            import dataclasses

            train, test = data
            mean = train.x.mean(0, keepdim=True)
            train.x.sub_(mean)  # the subset's own tensor (as samkit eos has always done)
            data = (train, dataclasses.replace(test, x=test.x - mean))
    if cache:
        _CACHE.clear()
        _CACHE[key] = data
    return data


def config_data(cfg: Any, device: Any = "cpu", cache: bool = False) -> tuple[Any, Any]:
    """The splits of a :class:`~samkit.config.TrainConfig`'s data section (standardized)."""
    return load_data(cfg.dataset, data_dir=cfg.data_dir, subset=cfg.subset,
                     stratified=cfg.stratified, label_noise=cfg.label_noise,
                     data_seed=cfg.data_seed, device=device, cache=cache)


def check_data_dir(cfg: Any) -> None:
    """A config's ``data_dir``, when given, must be a folder samkit may read data from."""
    if cfg.data_dir is not None:
        from samkit.data.paths import check_data_roots

        check_data_roots(cfg.data_dir)


def data_folder(dataset: str, data_dir: str | None) -> str | None:
    """The folder ``dataset`` was read from (None for a built-in or generated data set)."""
    from samkit.data import resolve_data_dir

    try:
        return str(resolve_data_dir(dataset, data_dir).resolve())
    except (ValueError, OSError):
        return None
