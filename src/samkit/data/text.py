"""Character-level text for the Transformer language model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from samkit.data.idx import CorruptFileError
from samkit.data.paths import DataNotFoundError
from samkit.data.split import DataSplit


def _windows(tokens: np.ndarray, seq_len: int, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    starts = np.arange(0, len(tokens) - seq_len, stride)
    idx = starts[:, None] + np.arange(seq_len + 1)  # windows of seq_len + 1 tokens
    win = torch.from_numpy(tokens[idx])
    return win[:, :-1].contiguous(), win[:, 1:].contiguous()


def load_text(
    path: str | Path,
    seq_len: int,
    train_fraction: float = 0.9,
    stride: int | None = None,
    device: str | torch.device = "cpu",
) -> tuple[DataSplit, DataSplit]:
    """A UTF-8 text file as character-level language-modelling data: ``(train, test)``.

    The vocabulary is the sorted set of characters of the whole file (``split.classes``; token
    ``i`` is ``classes[i]``), so ``num_classes`` is its size. The first ``train_fraction`` of the
    characters is the training text, the rest the test text (contiguous, so no window spans
    both). Each example is a window: ``x`` = ``seq_len`` tokens (int64), ``y`` = the same window
    shifted by one (the next tokens), both ``N×seq_len``. Windows start every ``stride``
    characters (default ``seq_len``: no overlap).

    Raises:
        DataNotFoundError: the file does not exist.
        CorruptFileError: it is not UTF-8 text.
        ValueError: a bad ``seq_len``, ``stride`` or ``train_fraction``, or a text too short
            for one window in each split.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"Invalid seq_len: {seq_len!r} (a positive integer)")
    stride = seq_len if stride is None else stride
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"Invalid stride: {stride!r} (a positive integer)")
    if not isinstance(train_fraction, (int, float)) or not 0 < train_fraction < 1:
        raise ValueError(f"Invalid train_fraction: {train_fraction!r} (in (0, 1))")
    path = Path(path)
    if not path.is_file():
        raise DataNotFoundError(
            f"Text file not found: {path.resolve()}. Pass the path of a UTF-8 text file (for "
            "example the tiny-shakespeare input.txt)."
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise CorruptFileError(f"{path}: not UTF-8 text ({err})") from err
    vocab = sorted(set(text))
    lookup = {ch: i for i, ch in enumerate(vocab)}
    tokens = np.fromiter((lookup[ch] for ch in text), dtype=np.int64, count=len(text))
    cut = int(len(tokens) * train_fraction)
    parts = tokens[:cut], tokens[cut:]
    for part, which in zip(parts, ("train", "test"), strict=True):
        if len(part) < seq_len + 1:
            raise ValueError(
                f"{path}: the {which} text has {len(part)} characters, fewer than seq_len + 1 = "
                f"{seq_len + 1}; use a longer text or a smaller seq_len"
            )
    splits = []
    for part in parts:
        x, y = _windows(part, seq_len, stride)
        splits.append(DataSplit(x.to(device), y.to(device), len(vocab), (seq_len,),
                                f"text:{path.name}", tuple(vocab)))
    return splits[0], splits[1]
