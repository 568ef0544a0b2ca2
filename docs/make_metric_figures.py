"""Make the figures and the example table of docs/metric.md.

Run: .venv/bin/python docs/make_metric_figures.py

Writes docs/figures/metric_examples.png, metric_spectra.png and metric_sweeps.png, and
prints the Markdown tables of s, f and h that docs/metric.md quotes. Every number comes
from sp2ps_onnx.metric; the figures are drawn with sp2ps_onnx.figures (matplotlib), the
module the reports use.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from sp2ps_onnx import figures, metric

SIZE = 224
FIGURES = Path(__file__).resolve().parent / "figures"
# The reference CAM: a main blob on the object and a weaker one on a second part of it.
BLOBS = [((96.0, 100.0), 20.0, 1.0), ((150.0, 146.0), 11.0, 0.6)]


def cam(shift=(0.0, 0.0), scale=1.0) -> np.ndarray:
    """The reference CAM, moved by ``shift`` pixels and scaled by ``scale`` about the centre."""
    rows, cols = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    centre = (SIZE - 1) / 2
    out = np.zeros((SIZE, SIZE))
    for (row, col), sigma, weight in BLOBS:
        row = centre + scale * (row - centre) + shift[0]
        col = centre + scale * (col - centre) + shift[1]
        sigma = scale * sigma
        out += weight * np.exp(-((rows - row) ** 2 + (cols - col) ** 2) / (2 * sigma**2))
    return metric.normalize_maps(out)


def noisy(level: float, seed: int = 0) -> np.ndarray:
    """The reference plus Gaussian noise of standard deviation ``level``, smoothed over about
    3 px like the noise of an upsampled CAM (white pixel noise would swamp both measures)."""
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.standard_normal((SIZE, SIZE)), 3.0)
    return metric.normalize_maps(cam() + level * noise / noise.std())


def blurred(sigma: float) -> np.ndarray:
    return metric.normalize_maps(ndimage.gaussian_filter(cam(), sigma, mode="constant"))


EXAMPLES = {
    "reference": lambda: cam(),
    "shifted (+30 px right, +20 px down)": lambda: cam(shift=(20.0, 30.0)),
    "scaled (x1.4 about the centre)": lambda: cam(scale=1.4),
    "blurred (Gaussian, sigma 12 px)": lambda: blurred(12.0),
    "noisy (smooth noise, sd 0.05)": lambda: noisy(0.05),
    "empty (all zeros)": lambda: np.zeros((SIZE, SIZE)),
}


def examples_figure(maps: dict[str, np.ndarray], scores: dict[str, metric.PerSample]) -> None:
    fig = figures.new_figure(3.0 * len(maps), 3.4)
    with figures.style():
        axes = fig.subplots(1, len(maps))
    for ax, (name, image) in zip(axes, maps.items(), strict=True):
        ax.imshow(image, cmap=figures.colormap(figures.DEFAULT_CMAP), vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        per = scores[name]
        title = name.split(" (")[0]
        ax.set_title(
            f"{title}\ns={per.spatial[0]:.3f}  f={per.spectral[0]:.3f}\nh={per.h[0]:.3f}",
            fontsize=10,
        )
    fig.suptitle("Each CAM against the reference (P = reference, Q = the CAM shown)")
    figures.save_figure(fig, FIGURES / "metric_examples", ["png"], dpi=80)


def spectra_figure(maps: dict[str, np.ndarray]) -> None:
    names = [name for name in maps if not name.startswith("empty")]
    fig = figures.new_figure(2.8 * len(names), 5.8)
    with figures.style():
        axes = fig.subplots(2, len(names))
    for column, name in enumerate(names):
        spectrum = np.abs(np.fft.fft2(maps[name]))
        spectrum[0, 0] = 0.0
        spectrum = np.fft.fftshift(spectrum)
        crop = spectrum[SIZE // 2 - 32 : SIZE // 2 + 32, SIZE // 2 - 32 : SIZE // 2 + 32]
        axes[0, column].imshow(maps[name], cmap=figures.colormap(figures.DEFAULT_CMAP), vmin=0, vmax=1)
        axes[0, column].set_title(name.split(" (")[0], fontsize=10)
        axes[1, column].imshow(np.log1p(crop), cmap="magma")
        for ax in axes[:, column]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[1, 0].set_ylabel("log(1 + |FFT2|), DC removed,\ncentral 64x64 frequencies", fontsize=9)
    fig.suptitle(
        "Magnitude spectra: a shift leaves them unchanged; scale, blur and noise do not"
    )
    figures.save_figure(fig, FIGURES / "metric_spectra", ["png"], dpi=80)


def sweeps_figure() -> None:
    reference = cam()
    sweeps = {
        "shift (px, to the right)": (np.arange(0, 61, 5), lambda v: cam(shift=(0.0, v))),
        "scale factor": (np.linspace(1.0, 2.0, 11), lambda v: cam(scale=v)),
        "blur sigma (px)": (np.arange(0, 25, 3), lambda v: blurred(v) if v else reference),
        "noise sd": (np.linspace(0.0, 0.5, 11), lambda v: noisy(v)),
    }
    fig = figures.new_figure(4.2 * len(sweeps), 3.4)
    with figures.style():
        axes = fig.subplots(1, len(sweeps), sharey=True)
    for ax, (label, (values, make)) in zip(axes, sweeps.items(), strict=True):
        Q = np.stack([make(float(v)) for v in values])
        P = np.broadcast_to(reference, Q.shape)
        per = metric.sp2ps(P, Q)
        ax.plot(values, per.spatial, "o-", label="s (SSIM)")
        ax.plot(values, per.spectral, "s-", label="f (spectral TV)")
        ax.plot(values, per.h, "k^-", label="h (harmonic)")
        ax.set_xlabel(label)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("similarity to the reference")
    axes[0].legend(loc="lower left")
    figures.save_figure(fig, FIGURES / "metric_sweeps", ["png"], dpi=80)


def main() -> None:
    FIGURES.mkdir(parents=True, exist_ok=True)
    maps = {name: make() for name, make in EXAMPLES.items()}
    reference = maps["reference"]
    scores = {name: metric.sp2ps(reference, image) for name, image in maps.items()}
    examples_figure(maps, scores)
    spectra_figure(maps)
    sweeps_figure()

    print("| Q (vs the reference P) | s (SSIM) | f (spectral TV) | h |")
    print("|---|---|---|---|")
    for name, per in scores.items():
        print(f"| {name} | {per.spatial[0]:.3f} | {per.spectral[0]:.3f} | {per.h[0]:.3f} |")
    print()
    combos = [(s, f) for s in metric.SPATIAL for f in metric.SPECTRAL]
    print("| Q | " + " | ".join(f"h {s}+{f}" for s, f in combos) + " |")
    print("|---|" + "---|" * len(combos))
    for name, image in maps.items():
        values = [metric.sp2ps(reference, image, s, f).h[0] for s, f in combos]
        print(f"| {name.split(' (')[0]} | " + " | ".join(f"{v:.3f}" for v in values) + " |")


if __name__ == "__main__":
    main()
