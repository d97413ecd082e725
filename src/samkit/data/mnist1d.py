"""MNIST-1D (Greydanus & Kobak, "Scaling down deep learning with MNIST-1D", ICML 2024),
generated locally from the published recipe; it is never downloaded.

Ten hand-written 1-D templates of 12 points are padded, stretched, scaled, translated (with
wrap-around), given correlated background noise and i.i.d. noise, sheared, and resampled to 40
points. Defaults are the paper's: 5,000 examples, 4,000 train / 1,000 test, sequence length 40.
The numbers come from ``numpy.random.default_rng(seed)`` rather than the original's global
``np.random`` state, so the data set has the same distribution but not the same bytes as the
reference pickle.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_TEMPLATES = np.array(
    [
        [5, 6, 6.5, 6.75, 7, 7, 7, 7, 6.75, 6.5, 6, 5],
        [5, 3, 3, 3.4, 3.8, 4.2, 4.6, 5, 5.4, 5.8, 5, 5],
        [5, 6, 6.5, 6.5, 6, 5.25, 4.75, 4, 3.5, 3.5, 4, 5],
        [5, 6, 6.5, 6.5, 6, 5, 5, 6, 6.5, 6.5, 6, 5],
        [5, 4.4, 3.8, 3.2, 2.6, 2.6, 5, 5, 5, 5, 5, 5],
        [5, 3, 3, 3, 3, 5, 6, 6.5, 6.5, 6, 4.5, 5],
        [5, 4, 3.5, 3.25, 3, 3, 3, 3, 3.25, 3.5, 4, 5],
        [5, 7, 7, 6.6, 6.2, 5.8, 5.4, 5, 4.6, 4.2, 5, 5],
        [5, 4, 3.5, 3.5, 4, 5, 5, 4, 3.5, 3.5, 4, 5],
        [5, 4, 3.5, 3.5, 4, 5, 5, 5, 5, 4.7, 4.3, 5],
    ]
)


@dataclass(frozen=True)
class MNIST1DConfig:
    """The published generation settings (``get_dataset_args`` of the reference code)."""

    num_samples: int = 5000  # examples in total, equal per class
    train_split: float = 0.8  # first 80% train, the rest test
    template_len: int = 12  # points per template
    padding: tuple[int, int] = (36, 60)  # zeros appended to a template: uniform in [36, 60]
    scale_coeff: float = 0.4  # amplitude scaled by 1 + 0.4 * U(-0.5, 0.5)
    max_translation: int = 48  # circular shift uniform in 0..47
    corr_noise_scale: float = 0.25  # Gaussian-smoothed (sigma 2) background noise
    iid_noise_scale: float = 2e-2  # white noise on every point
    shear_scale: float = 0.75  # a linear ramp of slope 0.75 * U(-0.5, 0.5)
    final_seq_length: int = 40  # points after resampling
    seed: int = 42  # the reference seed


def templates() -> np.ndarray:
    """The ten templates, whitened, shifted to start at zero and divided by 6 (10 × 12)."""
    x = _TEMPLATES - _TEMPLATES.mean(1, keepdims=True)
    x = x / x.std(1, keepdims=True)
    return (x - x[:, :1]) / 6.0


def _gaussian_smooth(x: np.ndarray, sigma: float = 2.0, truncate: float = 4.0) -> np.ndarray:
    # scipy.ndimage.gaussian_filter(x, sigma) for 1-D input, mode "reflect" (half-sample).
    radius = int(truncate * sigma + 0.5)
    t = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (t / sigma) ** 2)
    kernel /= kernel.sum()
    padded = np.pad(x, radius, mode="symmetric")
    return np.convolve(padded, kernel, mode="valid")


def _resample(x: np.ndarray, n: int) -> np.ndarray:
    return np.interp(np.linspace(0, 1, n), np.linspace(0, 1, len(x)), x)


def _transform(x: np.ndarray, cfg: MNIST1DConfig, rng: np.random.Generator) -> np.ndarray:
    low, high = cfg.padding
    pad = low + int(rng.random() * (high - low + 1))
    x = np.concatenate([x + 1e-8, np.zeros(pad)])  # pad (eps keeps the signal non-zero)
    x = _resample(x, cfg.template_len + high)  # dilate
    x = x * (1 + cfg.scale_coeff * (rng.random() - 0.5))  # scale
    k = int(rng.integers(cfg.max_translation))
    x = np.concatenate([x[len(x) - k :], x[: len(x) - k]])  # translate (circular)
    mask = x != 0
    noise = _gaussian_smooth(cfg.corr_noise_scale * rng.standard_normal(x.shape))
    x = mask * x + (1 - mask) * noise  # correlated noise where there is no signal
    x = x + cfg.iid_noise_scale * rng.standard_normal(x.shape)
    x = x - cfg.shear_scale * (rng.random() - 0.5) * np.linspace(-0.5, 0.5, len(x))  # shear
    return _resample(x, cfg.final_seq_length)


def make_mnist1d(
    cfg: MNIST1DConfig | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Generate MNIST-1D: ``(x_train, y_train, x_test, y_test)``, float32 ``N×40`` and int64.

    Seeded by ``cfg.seed``: the same config gives the same arrays. As in the reference, the
    whole set is centred and scaled to unit standard deviation before the train/test split.
    """
    cfg = cfg or MNIST1DConfig()
    rng = np.random.default_rng(cfg.seed)
    temps = templates()
    per_class = cfg.num_samples // len(temps)
    xs, ys = [], []
    for label, template in enumerate(temps):
        for _ in range(per_class):
            xs.append(_transform(template, cfg, rng))
            ys.append(label)
    order = rng.permutation(len(ys))
    x = np.stack(xs)[order]
    y = np.asarray(ys, dtype=np.int64)[order]
    x = (x - x.mean()) / x.std()
    split = int(len(y) * cfg.train_split)
    x = x.astype(np.float32)
    return x[:split], y[:split], x[split:], y[split:]
