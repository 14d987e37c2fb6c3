"""`avstrain`: train, evaluate, predict. The command line parses arguments and calls the library.

Bad input or a bad config from any command ends in one line and exit code 2 (`avsprep.cli_support.CommandGroup`).
torch is imported inside the commands, so `avstrain --help` starts at once.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import click

from avsprep.cli_support import command_group, configure_logging, progress
from avsprep.errors import InputError
from avstrain.config import ConfigError

EXISTING_DIR = click.Path(exists=True, file_okay=False, path_type=Path)
EXISTING_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


@command_group("avstrain", ConfigError)
def main(verbose: bool) -> None:
    """Train and evaluate the AVSBench TPAVI model on avsprep shards."""
    configure_logging(verbose)


@main.command()
@click.option("--config", "config_path", type=EXISTING_FILE, help="TOML config (configs/*.toml).")
@click.option("--shards", required=True, type=EXISTING_DIR, help="Shard folder written by avsprep crops.")
@click.option("--name", help="Run name: writes runs/<name>/ (default: the config file's stem).")
@click.option("--runs", default=Path("runs"), type=click.Path(file_okay=False, path_type=Path), show_default=True)
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="Override a config field.")
@click.option("--resume", is_flag=True, help="Continue from runs/<name>/last.pt exactly where it stopped.")
def train(config_path, shards, name, runs, overrides, resume):
    """Train the model; writes config.toml, steps.jsonl, metrics.jsonl, last.pt, best.pt."""
    from avstrain.config import load_config
    from avstrain.models import get_kind
    from avstrain.train import train as run_training

    config = load_config(config_path, list(overrides))
    run_dir = runs / (name or (config_path.stem if config_path else "default"))
    show = os.environ.get("RANK", "0") == "0"  # under torchrun, one progress bar: rank 0's
    with progress(f"training {run_dir.name}", show=show) as advance:
        result = run_training(config, shards, run_dir, resume=resume, progress=advance)
    if show:
        metric = get_kind(config.model.kind).best_metric
        best = f"best val {metric} {result['best_metric']:.4f}" if result["best_metric"] >= 0 else "not validated yet"
        click.echo(f"{result['steps']} steps; {best}; run folder {run_dir}")


@main.command(name="eval")
@click.option("--checkpoint", required=True, type=EXISTING_FILE)
@click.option("--shards", required=True, type=EXISTING_DIR)
@click.option("--split", default="test", show_default=True)
@click.option("--suite", help="An evaluation suite of the model's kind besides the default one (tpavi: reliance, "
                               "the audio-reliance suite: true, swap, silence, noise, off-screen; tpavi: hearing, own vs "
                               "swapped audio against the true mask, docs/design.md §17; every kind: "
                               "localisation, heat maps, correspondence and retrieval, docs/design.md §13).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="JSON output (default: eval-<split>.json or reliance.json beside the checkpoint; "
                   "with --format avsbench prefixed by the checkpoint's stem).")
@click.option("--batch-size", default=4, show_default=True, type=click.IntRange(1))
@click.option("--workers", default=0, show_default=True, type=click.IntRange(0))
@click.option("--format", "checkpoint_format", default="avs-toolkit", show_default=True,
              type=click.Choice(["avs-toolkit", "avsbench"]),
              help="avsbench: a released AVSBench checkpoint (S4_best.pth, MS3_best.pth), built from --config.")
@click.option("--config", "config_path", type=EXISTING_FILE, help="With --format avsbench: the model's config.")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="With --format avsbench: override a config field.")
def evaluate(checkpoint, shards, split, suite, out, batch_size, workers, checkpoint_format, config_path, overrides):
    """mIoU, F and F_avsbench overall and per class, or another suite (reliance); JSON plus a table."""
    from avstrain.config import load_config
    from avstrain.evaluate import format_table
    from avstrain.models import get_kind
    from avstrain.runtime import load_for_inference

    if checkpoint_format != "avsbench" and (config_path or overrides):
        raise ConfigError("--config and --set apply to --format avsbench; a trained checkpoint holds its config")
    config = load_config(config_path, list(overrides)) if checkpoint_format == "avsbench" else None
    model, config, runtime = load_for_inference(checkpoint, checkpoint_format=checkpoint_format, config=config)
    suites = get_kind(config.model.kind).suites()
    if (suite or "default") not in suites:
        raise ConfigError(f"--suite {suite}: model kind {config.model.kind!r} has the suites {', '.join(suites)}")
    results = suites[suite or "default"](model, shards, split, runtime.device, runtime.amp_dtype,
                                         batch_size=batch_size, num_workers=workers)
    if out is None:
        # Released checkpoints share a folder (S4_best.pth, MS3_best.pth): name the output after the file.
        prefix = f"{checkpoint.stem}-" if checkpoint_format == "avsbench" else ""
        out = checkpoint.parent / (prefix + (f"{suite}.json" if suite else f"eval-{split}.json"))
    out.write_text(json.dumps(results, indent=1) + "\n")
    click.echo(format_table(results))
    click.echo(f"wrote {out}")


@main.command()
@click.option("--checkpoint", required=True, type=EXISTING_FILE)
@click.option("--shards", type=EXISTING_DIR, help="Shard folder: predict every clip of --split.")
@click.option("--video", type=EXISTING_FILE,
              help="Or a video file of your own (mp4, mkv, webm, avi, mov): frames at 1 per second, its own sound.")
@click.option("--audio", type=EXISTING_FILE, help="With --video: this sound (WAV/FLAC/OGG) instead of the video's.")
@click.option("--out-video", type=click.Path(dir_okay=False, path_type=Path),
              help="With --video: also write the segmentation as a video (every source frame with the mask of its "
                   "second, or a localiser's heat map, the source's sound).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--split", default="test", show_default=True)
@click.option("--batch-size", default=4, show_default=True, type=click.IntRange(1))
@click.option("--overlays", default=0, show_default=True, type=click.IntRange(0),
              help="Also draw overlay grids (frame, truth, prediction, heat map; own, swapped and silent audio) "
                   "for the first N clips into <out>/overlays/.")
@click.option("--frames-per-clip", type=click.IntRange(1), help="With --video: seconds per window "
                                                                "(default: the training shards' T, else 5).")
@click.option("--vggish-weights", type=EXISTING_FILE, help="With --video: for a checkpoint trained on VGGish audio.")
@click.option("--vggish-pca", type=EXISTING_FILE, help="With --video: VGGish PCA parameters, if the shards used them.")
@click.option("--layout", default="dataset", show_default=True, type=click.Choice(["dataset", "reference"]),
              help="Semantic models: colour PNGs in the download's layout, <label>/<uid>/labels_rgb/<i>.png (label: "
                   "v1s, v1m or v2; real frames), or as the reference's save_color_mask writes them "
                   "(<uid>/<uid>_<i>.png, all ten frames, 360x240).")
def predict(checkpoint, shards, video, audio, out_video, out, split, batch_size, overlays, frames_per_clip,
            vggish_weights, vggish_pca, layout):
    """Masks for every clip in the AVSBench layout (<split>/<category>/<clip>/<clip>_<k>.png), or for a video."""
    from avstrain.runtime import load_for_inference

    if (shards is None) == (video is None):
        raise InputError(None, "give exactly one of --shards DIR and --video FILE")
    if video is None and (audio or out_video or vggish_weights or vggish_pca or frames_per_clip):
        raise InputError(None, "--audio, --out-video, --vggish-weights, --vggish-pca and --frames-per-clip go with "
                               "--video")
    model, config, runtime = load_for_inference(checkpoint)
    if video is not None:
        _predict_video(model, config, runtime, checkpoint, video, audio, out, frames_per_clip, vggish_weights,
                       vggish_pca, out_video)
    else:
        _predict_shards(model, runtime, shards, out, split, batch_size, overlays, layout)


def _predict_video(model, config, runtime, checkpoint, video, audio, out, frames_per_clip, vggish_weights,
                   vggish_pca, out_video) -> None:
    from avstrain.video_out import write_segmentation_video
    from avstrain.visualise import choose_embedder, segment_video

    recorded = runtime.checkpoint
    embedder = choose_embedder(recorded, checkpoint, vggish_weights, vggish_pca) if config.model.audio else None
    result = segment_video(model, video, audio, out, embedder, frames_per_clip or recorded.get("frames_per_clip") or 5,
                           device=runtime.device, amp_dtype=runtime.amp_dtype)
    what = "masks" if result.heat is None else "heat maps"  # a localiser draws no mask
    click.echo(f"{video}: {result.seconds} frames at 1 per second ({result.fps:g} fps video), audio "
               f"{'from ' + str(audio) if audio else 'from the video'} through {result.embedder}; "
               f"wrote {len(result.masks)} {what} and {len(result.overlays)} overlay grids to {out}")
    if out_video is not None:
        with progress("writing video") as advance:
            written = write_segmentation_video(video, result.probabilities, out_video, audio, progress=advance,
                                               heat=result.heat)
        click.echo(f"wrote {written.path}: {written.frames} frames at {float(written.frame_rate):g} fps, "
                   f"{written.overlay} overlaid, audio from {written.audio}")


def _predict_shards(model, runtime, shards, out, split, batch_size, overlays, layout="dataset") -> None:
    from avsprep.shards import read_manifest
    from avstrain.predict import write_predictions
    from avstrain.semantic_eval import is_semantic
    from avstrain.semantic_predict import write_semantic_predictions
    from avstrain.visualise import write_overlays

    clips = read_manifest(shards)["splits"].get(split, 0)
    if is_semantic(model):
        with progress("predicting clips", total=clips) as advance:
            written = write_semantic_predictions(model, shards, out, split, runtime.device, runtime.amp_dtype,
                                                 batch_size, layout, progress=advance)
        click.echo(f"wrote {written} colour masks ({layout} layout) of {clips} clips to {out}")
        return
    with progress("predicting clips", total=clips) as advance:
        written = write_predictions(model, shards, out, split, runtime.device, runtime.amp_dtype, batch_size,
                                    progress=advance)
    what = "heat maps" if hasattr(model, "heatmaps") else "masks"  # a localiser draws no mask
    click.echo(f"wrote {written} {what} of {clips} clips to {out}")
    if overlays:
        with progress("overlay grids", total=min(overlays, clips)) as advance:
            result = write_overlays(model, shards, out / "overlays", overlays, split, runtime.device,
                                    runtime.amp_dtype, progress=advance)
        click.echo(f"wrote {len(result.written)} overlay grids ({', '.join(result.conditions)} audio) "
                   f"to {out / 'overlays'}")


@main.command()
@click.option("--pred", required=True, type=EXISTING_DIR, help="Predicted mask PNGs (> 127 is object).")
@click.option("--gt", required=True, type=EXISTING_DIR, help="Ground-truth mask PNGs (non-zero is object).")
@click.option("--layout", type=click.Choice(["s4", "ms3"]), help="Informational: both layouts are read by file name.")
@click.option("--index-base", default=1, show_default=True, type=click.Choice(["0", "1"]),
              help="First frame number of the predictions (the reference's save_mask writes 0).")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False, path_type=Path), help="Per-clip scores.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="JSON of the overall scores.")
@click.option("--semantic", is_flag=True, help="AVSS colour masks: the official semantic mIoU and F (--gt: the "
                                               "AVSBench-semantic folder; --pred: either predict layout).")
@click.option("--num-classes", default=71, show_default=True, type=click.IntRange(2), help="With --semantic: K.")
@click.option("--split", help="With --semantic: score only this split's clips of --gt's metadata.csv (e.g. test; "
                              "default: every ground-truth mask under --gt).")
def score(pred, gt, layout, index_base, csv_path, out, semantic, num_classes, split):
    """Score any method's predicted masks against ground truth: mIoU, F, F_avsbench, FPR on empty targets."""
    from avstrain.predict import score_directories

    if semantic:
        from avstrain.semantic_predict import score_semantic

        results = score_semantic(pred, gt, num_classes, split)
        if out:
            out.write_text(json.dumps(results, indent=1) + "\n")
        click.echo(f"{results['clips']} clips, {results['frames']} frames with ground truth: semantic mIoU "
                   f"{results['miou']:.4f}, F {results['f']:.4f} (K = {num_classes}); off-palette colours of the "
                   f"predictions mapped to the nearest palette colour, predictions resized to the ground truth "
                   f"(nearest); {results['missing_predictions']} frames without a prediction scored as background")
        return
    if split is not None:
        raise InputError(None, "--split goes with --semantic (S4/MS3 predictions are already in split folders)")
    results = score_directories(pred, gt, int(index_base), csv_path)
    if out:
        out.write_text(json.dumps(results, indent=1) + "\n")
    fpr = "n/a" if results["fpr"] is None else f"{results['fpr']:.4f}"
    click.echo(f"{results['clips']} clips, {results['frames']} frames: mIoU {results['miou']:.4f}, F {results['f']:.4f}, "
               f"F_avsbench {results['f_avsbench']:.4f}, FPR (empty targets) {fpr}")


@main.command()
@click.argument("run_dir", type=EXISTING_DIR)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="PNG (default: <run>/curves.png).")
def plot(run_dir, out):
    """Loss parts (steps.jsonl) and validation metrics (metrics.jsonl) over epochs as a PNG."""
    from avstrain.plot import plot_run

    click.echo(f"wrote {plot_run(run_dir, out)}")


@main.command()
@click.argument("run_dir", type=EXISTING_DIR)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="HTML (default: <run>/report.html).")
def report(run_dir, out):
    """One self-contained HTML page: config, metrics and reliance tables, curves, t-SNE, overlay grids."""
    from avstrain.report import write_report

    click.echo(f"wrote {write_report(run_dir, out)}")


if __name__ == "__main__":
    main()
