"""t-SNE of crop embeddings: does the trained model separate the object classes? (docs/design.md §1, point 4)

    avsprep tsne --shards shards/ --checkpoint runs/x/best.pt [--checkpoint runs/y/best.pt] --out tsne.png

The crops of one split (one per valid frame, labelled with the clip's primary class) are embedded by the
checkpoint's model (`embed_crops`: which trunk embeds a crop is the model's business, see `avstrain.models`). The
embeddings are reduced with PCA to 50 dimensions, then with scikit-learn's Barnes-Hut t-SNE to 2, and drawn
coloured by class; several checkpoints give side-by-side panels over the same crops. Each panel carries the
silhouette score of the classes, in the 2-D picture and in the 50-d PCA space, so the picture has a number.

The maths (`tsne_panel`, `draw`) is a function of arrays and labels. The trainer is reached in one place only,
`embed_with_checkpoint`, which imports `avstrain.runtime` (and torch) when it runs: `avsprep` never imports
`avstrain` or torch at start.

t-SNE settings are chosen for speed at 20,000 points (measured, see the README): PCA initialisation, Barnes-Hut with
angle 0.8 instead of 0.5 and 500 iterations instead of 1000 (250 of them early exaggeration). On 20,000 clustered
50-d points that cut the CPU time from about 130 s to 88 s while the final KL divergence stayed the same (4.10).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from avsprep.errors import InputError
from avsprep.shards import read_manifest

log = logging.getLogger(__name__)

PCA_DIMS = 50
MIN_POINTS = 5
SILHOUETTE_SAMPLE = 10000  # silhouette is O(N^2): score a seeded sample beyond this many points


@dataclass
class TSNESettings:
    """How crops are chosen and embedded, and the t-SNE parameters."""

    split: str = "val"
    max_points: int = 20000
    batch_size: int = 256
    seed: int = 0
    perplexity: float = 30.0
    iterations: int = 500  # sklearn's minimum is 250 (all of them early exaggeration)
    angle: float = 0.8  # Barnes-Hut trade-off: 0.5 is sklearn's default; 0.8 is about 1.5x faster here
    threads: int = -1  # t-SNE neighbour search and gradient: all cores


@dataclass
class CropSample:
    """The crops a t-SNE is drawn from: crops [N,c,c,3] uint8 RGB, labels [N] int64 (class index)."""

    crops: np.ndarray
    labels: np.ndarray
    classes: list[str]
    clips: int  # how many clips the crops come from
    available: int  # valid labelled crops in the split before subsampling


@dataclass
class Panel:
    """One checkpoint's picture: its 2-D points and what they say."""

    name: str
    features: str  # which network produced the embeddings
    points: np.ndarray  # [N,2]
    silhouette_2d: float | None
    silhouette_features: float | None
    embed_seconds: float
    tsne_seconds: float


@dataclass
class TSNEResult:
    out: Path
    panels: list[Panel]
    sample: CropSample
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)


def sample_crops(shards_dir: str | Path, split: str, max_points: int, seed: int = 0) -> CropSample:
    """Valid crops of clips with a class in `split`, at most `max_points` of them (a seeded uniform sample, in
    shard order). Reads the small datasets to choose, then one chunk (clip) per chosen clip."""
    shards_dir = Path(shards_dir)
    manifest = read_manifest(shards_dir)
    candidates: list[tuple[str, int, int, int]] = []  # (file, row, frame, label)
    for entry in manifest["shards"]:
        if not entry["splits"].get(split):
            continue
        with h5py.File(shards_dir / entry["file"], "r") as handle:
            rows = np.flatnonzero(handle["split"].asstr()[()] == split)
            labels = handle["label"][()]
            valid = handle["crop_valid"][()]
        for row in rows:
            if labels[row] < 0:
                continue
            candidates.extend((entry["file"], int(row), int(t), int(labels[row])) for t in np.flatnonzero(valid[row]))
    if len(candidates) < MIN_POINTS:
        raise InputError(shards_dir, f"split {split!r} has {len(candidates)} valid labelled crops; "
                                     f"a t-SNE needs at least {MIN_POINTS}")
    chosen = candidates
    if len(candidates) > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(len(candidates), max_points, replace=False))
        chosen = [candidates[i] for i in keep]
    crops, labels = [], []
    by_clip: dict[tuple[str, int], list[int]] = {}
    for file, row, t, label in chosen:
        by_clip.setdefault((file, row), []).append(t)
    label_of = {(file, row): label for file, row, _, label in chosen}
    open_files: dict[str, h5py.File] = {}
    try:
        for (file, row), frames in by_clip.items():
            if file not in open_files:
                open_files[file] = h5py.File(shards_dir / file, "r")
            clip = open_files[file]["crops"][row]  # [T,c,c,3]: one chunk
            crops.append(clip[frames])
            labels.extend([label_of[(file, row)]] * len(frames))
    finally:
        for handle in open_files.values():
            handle.close()
    return CropSample(crops=np.concatenate(crops), labels=np.asarray(labels, np.int64), classes=manifest["classes"],
                      clips=len(by_clip), available=len(candidates))


@dataclass
class CheckpointEmbedding:
    """Crops embedded by one checkpoint's model."""

    name: str  # the checkpoint, in words: `<run>/<file> (epoch e)`
    features: np.ndarray  # [N,E] float32
    source: str  # which network produced them, in words
    seconds: float


def embed_with_checkpoint(checkpoint: str | Path, crops: np.ndarray, batch_size: int = 256,
                          progress: Callable[[int], None] | None = None) -> CheckpointEmbedding:
    """Crops [N,c,c,3] uint8 RGB embedded by a checkpoint's model, in batches, with the device, precision and
    memory format it trained with: the one call from avsprep into avstrain (imported here, not at start)."""
    import torch

    from avstrain.runtime import load_for_inference

    checkpoint = Path(checkpoint)
    model, _, runtime = load_for_inference(checkpoint)
    started = time.perf_counter()
    out = []
    with torch.no_grad(), runtime.autocast():
        for start in range(0, len(crops), batch_size):
            batch = torch.from_numpy(crops[start:start + batch_size]).to(runtime.device).permute(0, 3, 1, 2)
            out.append(model.embed_crops(batch).float().cpu().numpy())  # [b,E]
            if progress:
                progress(len(batch))
    name = f"{checkpoint.parent.name}/{checkpoint.name} (epoch {runtime.checkpoint.get('epoch', '?')})"
    return CheckpointEmbedding(name=name, features=np.concatenate(out), source=model.crop_embedding_source,
                               seconds=time.perf_counter() - started)


def project(features: np.ndarray, settings: TSNESettings) -> tuple[np.ndarray, np.ndarray]:
    """features [N,D] -> (PCA to min(50, N, D) dims [N,d], t-SNE [N,2])."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    n = len(features)
    reduced = PCA(min(PCA_DIMS, n, features.shape[1]), random_state=settings.seed).fit_transform(features)
    # sklearn requires perplexity < N; small splits (tests, tiny datasets) get a proportionate one.
    perplexity = min(settings.perplexity, max(1.0, (n - 1) / 3))
    points = TSNE(2, perplexity=perplexity, init="pca", method="barnes_hut", angle=settings.angle,
                  max_iter=max(250, settings.iterations), n_jobs=settings.threads,
                  random_state=settings.seed).fit_transform(reduced.astype(np.float32))
    return reduced, points


def silhouette(points: np.ndarray, labels: np.ndarray, seed: int = 0) -> float | None:
    """Silhouette score of the classes (-1..1, higher: better separated); None with fewer than 2 classes."""
    from sklearn.metrics import silhouette_score

    classes = len(np.unique(labels))
    if classes < 2 or classes >= len(labels):
        return None
    sample = SILHOUETTE_SAMPLE if len(labels) > SILHOUETTE_SAMPLE else None
    return float(silhouette_score(points, labels, sample_size=sample, random_state=seed))


def tsne_panel(features: np.ndarray, labels: np.ndarray, settings: TSNESettings, name: str = "",
               source: str = "", embed_seconds: float = 0.0) -> Panel:
    """The t-SNE panel of features [N,D] with class labels [N]: PCA, t-SNE, and the silhouette of the classes in
    both spaces."""
    started = time.perf_counter()
    reduced, points = project(features, settings)
    tsne_seconds = time.perf_counter() - started
    return Panel(name=name, features=source, points=points,
                 silhouette_2d=silhouette(points, labels, settings.seed),
                 silhouette_features=silhouette(reduced, labels, settings.seed),
                 embed_seconds=embed_seconds, tsne_seconds=tsne_seconds)


def draw(panels: list[Panel], labels: np.ndarray, classes: list[str], out: str | Path, title: str = "") -> Path:
    """Side-by-side scatter panels coloured by class, one legend; writes a PNG and returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    present = [c for c in range(len(classes)) if (labels == c).any()]
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels) + 1.5, 5.5), squeeze=False)
    size = max(1.0, min(20.0, 4000.0 / len(labels)))
    for ax, panel in zip(axes[0], panels):
        for c in present:
            chosen = labels == c
            ax.scatter(panel.points[chosen, 0], panel.points[chosen, 1], s=size, color=cmap(c % cmap.N),
                       label=f"{classes[c]} ({int(chosen.sum())})", alpha=0.8, linewidths=0, rasterized=True)
        score = "n/a" if panel.silhouette_2d is None else f"{panel.silhouette_2d:.3f}"
        ax.set_title(f"{panel.name}\n{panel.features}\nsilhouette {score}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    handles, names = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names, loc="center right", markerscale=max(1.0, 30.0 / size) ** 0.5, fontsize=9,
               title="class")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 1.4 / fig.get_figwidth(), 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def run_tsne(checkpoints: list[str | Path], shards_dir: str | Path, out: str | Path,
             settings: TSNESettings | None = None, progress: Callable[[int, int], None] | None = None) -> TSNEResult:
    """Embed the same crops with every checkpoint, t-SNE each, draw the panels into `out` (PNG).

    `progress(newly_done, total)` counts crops embedded over all checkpoints (first called with 0 once the crops
    are chosen).
    """
    settings = settings or TSNESettings()
    if not checkpoints:
        raise InputError(None, "give at least one --checkpoint")
    started = time.perf_counter()
    sample = sample_crops(shards_dir, settings.split, settings.max_points, settings.seed)
    total = len(sample.labels) * len(checkpoints)
    report = (lambda n: progress(n, total)) if progress else None
    if report:
        report(0)
    panels = []
    for checkpoint in checkpoints:
        embedding = embed_with_checkpoint(checkpoint, sample.crops, settings.batch_size, report)
        panel = tsne_panel(embedding.features, sample.labels, settings, embedding.name, embedding.source,
                           embedding.seconds)
        log.info("%s: %d crops embedded in %.1f s, PCA + t-SNE in %.1f s", checkpoint, len(panel.points),
                 panel.embed_seconds, panel.tsne_seconds)
        panels.append(panel)
    title = (f"t-SNE of {len(sample.labels)} crops from {sample.clips} clips, split {settings.split}"
             + (f" (sampled from {sample.available})" if sample.available > len(sample.labels) else ""))
    t0 = time.perf_counter()
    path = draw(panels, sample.labels, sample.classes, out, title)
    return TSNEResult(out=path, panels=panels, sample=sample, seconds=time.perf_counter() - started,
                      timings={"draw": time.perf_counter() - t0})


__all__ = ["CheckpointEmbedding", "CropSample", "Panel", "TSNEResult", "TSNESettings", "draw", "embed_with_checkpoint",
           "project", "run_tsne", "sample_crops", "silhouette", "tsne_panel"]
