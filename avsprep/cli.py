"""`avsprep`: the command line of the preprocessing stages. It parses arguments and calls the library."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from avsprep.errors import exits_cleanly

EXISTING_DIR = click.Path(exists=True, file_okay=False, path_type=Path)
EXISTING_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)
exits_cleanly_on_bad_input = exits_cleanly("avsprep")


class ProgressBar:
    """A click progress bar created on the first update, when the total is known."""

    def __init__(self, label: str):
        self.label = label
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = click.progressbar(length=total, label=self.label, file=sys.stderr)
            self.bar.__enter__()
        self.bar.update(done)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log progress details.")
def main(verbose: bool) -> None:
    """Audio-visual segmentation data preparation: labelImg/AVSBench inputs to HDF5 shards."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def shard_options(command):
    """The options of the shards a command writes (`crops`, `avsbench`): sizes, embedder, parallelism, errors."""
    options = [
        click.option("--size", default=224, show_default=True, type=click.IntRange(8), help="Frame and mask side."),
        click.option("--crop-size", default=224, show_default=True, type=click.IntRange(8), help="Crop side."),
        click.option("--max-boxes", default=4, show_default=True, type=click.IntRange(1)),
        click.option("--embedder", default="logmel-stats", show_default=True,
                     type=click.Choice(["logmel-stats", "vggish"])),
        click.option("--vggish-weights", type=EXISTING_FILE, help="Local VGGish weights (public PyTorch port layout)."),
        click.option("--vggish-pca", type=EXISTING_FILE, help="Local VGGish PCA parameters: apply PCA postprocessing."),
        click.option("--clips-per-shard", default=64, show_default=True, type=click.IntRange(1)),
        click.option("--workers", default=1, show_default=True, type=click.IntRange(1), help="Processes."),
        click.option("--num-parts", default=1, show_default=True, type=click.IntRange(1),
                     help="Split the work into K parts."),
        click.option("--part-index", default=0, show_default=True, type=click.IntRange(0),
                     help="Which part this run writes."),
        click.option("--on-error", default="error", show_default=True, type=click.Choice(["error", "skip"]),
                     help="Stop at the first bad clip (exit 2), or skip bad clips and report them."),
        click.option("--compression", type=click.Choice(["gzip", "lzf"]), help="HDF5 compression (default: none)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command



def echo_crops_result(result, counted_extra: str = "") -> None:
    """The lines both shard-writing commands print after the summary: the report counts and skipped clips."""
    counted = {key: value for key, value in result.manifest["report"].items() if value}
    if counted:
        click.echo("report: " + ", ".join(f"{key} {value}" for key, value in counted.items()))
    if counted_extra:
        click.echo(counted_extra)
    if result.skipped:
        click.echo(f"skipped {len(result.skipped)} clips for bad input:")
        for skip in result.skipped:
            click.echo(f"  {skip['clip']}: {skip['error']}")


@main.command()
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Output folder.")
@click.option("--clips", default=600, show_default=True, type=click.IntRange(1))
@click.option("--num-classes", default=5, show_default=True, type=click.IntRange(3))
@click.option("--size", default=224, show_default=True, type=click.IntRange(32), help="Frame side in pixels.")
@click.option("--frames-per-clip", default=5, show_default=True, type=click.IntRange(1))
@click.option("--sources", default="1", type=click.Choice(["1", "2"]), help="Sounding objects per scene (2: MS3-style).")
@click.option("--difficulty", default="easy", type=click.Choice(["easy", "hard"]))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--yolo", is_flag=True, help="Also write labelImg YOLO txt files and classes.txt.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1))
@exits_cleanly_on_bad_input
def synth(out, clips, num_classes, size, frames_per_clip, sources, difficulty, seed, yolo, workers):
    """Generate synthetic AVS clips: two+ objects per scene, only the sounding one is the target."""
    from avsprep.synth import SynthConfig, generate

    config = SynthConfig(out=out, clips=clips, num_classes=num_classes, size=size, frames_per_clip=frames_per_clip,
                         sources=int(sources), difficulty=difficulty, seed=seed, yolo=yolo, workers=workers)
    with click.progressbar(length=clips, label="synth clips", file=sys.stderr) as bar:
        summary = generate(config, progress=bar.update)
    click.echo(f"wrote {summary.clips} clips to {out} in {summary.seconds:.1f} s; splits {summary.per_split}; "
               f"sounding classes {summary.per_class}")


@main.command()
@click.option("--voc", type=EXISTING_DIR, help="labelImg Pascal VOC XML folder (searched recursively).")
@click.option("--yolo", type=EXISTING_DIR, help="labelImg YOLO txt folder with classes.txt.")
@click.option("--images", type=EXISTING_DIR, help="Frames, found by file name recursively (default: next to the XML).")
@click.option("--masks", type=EXISTING_DIR, help="Ground-truth masks, found by frame stem recursively.")
@click.option("--other-masks", type=EXISTING_DIR, help="Masks of the visible non-sounding object (swap test).")
@click.option("--audio", type=EXISTING_DIR, help="Audio, <clip>.wav found recursively.")
@click.option("--meta", type=EXISTING_FILE, help="Metadata CSV (name, category, split, other_category).")
@click.option("--classes", type=EXISTING_FILE, help="Class list, one name per line (e.g. labelImg classes.txt).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Shard folder.")
@click.option("--trust-xml-paths", is_flag=True, help="Allow reading frames from the XML's <path>.")
@click.option("--clip-pattern", default="<clip>_<k>", show_default=True, help="How frame stems name clip and index.")
@click.option("--frames-per-clip", default=5, show_default=True, type=click.IntRange(1))
@click.option("--pad-short-clips", is_flag=True, help="Repeat the last frame of clips with fewer than T frames.")
@click.option("--val-fraction", default=0.0, show_default=True, type=float, help="Used when there is no --meta split.")
@click.option("--test-fraction", default=0.0, show_default=True, type=float)
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the --val/--test-fraction split.")
@shard_options
@exits_cleanly_on_bad_input
def crops(voc, yolo, images, masks, other_masks, audio, meta, classes, out, trust_xml_paths, clip_pattern,
          frames_per_clip, pad_short_clips, val_fraction, test_fraction, seed, **shard_settings):
    """Annotations + frames + masks + audio -> HDF5 shards and manifest.json."""
    from avsprep.clips import SourceOptions
    from avsprep.crops import CropsConfig, run_crops

    sources = SourceOptions(voc=voc, yolo=yolo, images=images, masks=masks, other_masks=other_masks, audio=audio,
                            meta=meta, classes=classes, trust_xml_paths=trust_xml_paths, clip_pattern=clip_pattern,
                            frames_per_clip=frames_per_clip, pad_short_clips=pad_short_clips,
                            val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)
    config = CropsConfig(out=out, **shard_settings)
    bar = ProgressBar("clips")
    try:
        result = run_crops(sources, config, progress=bar)
    finally:
        bar.close()
    manifest = result.manifest
    click.echo(f"{manifest['clips']} clips in {len(manifest['shards'])} shards at {out} "
               f"({result.written} written, {result.reused} already complete); splits {manifest['splits']}")
    echo_crops_result(result)


@main.command()
@click.option("--root", required=True, type=click.Path(path_type=Path),
              help="AVSBench download: the subset folder (Single-source/, Multi-sources/) or the one above them.")
@click.option("--subset", required=True, type=click.Choice(["s4", "ms3"]))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Shard folder.")
@click.option("--voc", type=EXISTING_DIR, help="labelImg Pascal VOC XML boxes, matched to frames by <filename>.")
@click.option("--yolo", type=EXISTING_DIR, help="labelImg YOLO txt boxes (with classes.txt), matched by frame stem.")
@click.option("--boxes-from-masks", is_flag=True, help="One box per frame: the bounding box of its mask.")
@click.option("--classes", type=EXISTING_FILE, help="Class list, one name per line (default: the CSV categories).")
@click.option("--frames-per-clip", default=5, show_default=True, type=click.IntRange(1))
@shard_options
@exits_cleanly_on_bad_input
def avsbench(root, subset, out, voc, yolo, boxes_from_masks, classes, frames_per_clip, **shard_settings):
    """AVSBench S4 / MS3 folders (metadata CSV, visual_frames, gt_masks, audio_wav) -> HDF5 shards."""
    from avsprep.avsbench import AvsbenchOptions, run_avsbench
    from avsprep.crops import CropsConfig

    options = AvsbenchOptions(root=root, subset=subset, voc=voc, yolo=yolo, boxes_from_masks=boxes_from_masks,
                              classes=classes, frames_per_clip=frames_per_clip)
    config = CropsConfig(out=out, **shard_settings)
    bar = ProgressBar("clips")
    try:
        result = run_avsbench(options, config, progress=bar)
    finally:
        bar.close()
    manifest = result.crops.manifest
    click.echo(f"AVSBench {subset.upper()} from {result.layout.meta.parent}: {manifest['clips']} clips in "
               f"{len(manifest['shards'])} shards at {out} ({result.crops.written} written, "
               f"{result.crops.reused} already complete); splits {manifest['splits']}")
    unmatched = result.unmatched_annotations
    echo_crops_result(result.crops, f"{len(unmatched)} label files name no frame of the CSV's clips "
                                    f"(first: {unmatched[0]})" if unmatched else "")


@main.command()
@click.argument("parts", nargs=-1, required=True, type=EXISTING_DIR)
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Merged shard folder.")
@exits_cleanly_on_bad_input
def merge(parts, out):
    """Join the folders of `crops --num-parts K --part-index i` runs into one, as a single run would have written."""
    from avsprep.shards import merge_parts

    manifest = merge_parts(list(parts), out)
    click.echo(f"{manifest['clips']} clips in {len(manifest['shards'])} shards at {out}; splits {manifest['splits']}")


@main.command()
@click.argument("shards", type=EXISTING_DIR)
@click.option("--verify", is_flag=True, help="Recheck checksums and shapes; exit 1 on any mismatch.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@exits_cleanly_on_bad_input
def inspect(shards, verify, as_json):
    """Clips per split and class, shapes, dtypes, embedder, sizes on disk."""
    from avsprep.shards import summarize, verify as verify_shards

    summary = summarize(shards, skip_unreadable=verify)
    problems = None
    if verify:
        with click.progressbar(length=summary["shards"], label="verifying shards", file=sys.stderr) as bar:
            problems = verify_shards(shards, progress=bar.update)
        summary["verify"] = {"ok": not problems, "problems": problems}
    if as_json:
        click.echo(json.dumps(summary, indent=1, ensure_ascii=False))
    else:
        click.echo(f"{summary['clips']} clips in {summary['shards']} shards, "
                   f"{summary['bytes_on_disk'] / 2**20:.1f} MiB on disk, embedder {summary['embedder']}, "
                   f"T={summary['frames_per_clip']}")
        for split, per_class in summary["clips_per_split_and_class"].items():
            click.echo(f"  {split:5s} {sum(per_class.values()):6d}  " + ", ".join(f"{k} {v}" for k, v in per_class.items()))
        for key, spec in summary["shapes"].items():
            click.echo(f"  {key:12s} {spec['dtype']:8s} {spec['shape']}")
        if summary["skipped"]:
            click.echo(f"  {summary['skipped']} clips were skipped for bad input (see manifest.json)")
        if problems is not None:
            click.echo("verify: ok" if not problems else "verify: FAILED\n" + "\n".join(f"  {p}" for p in problems))
    if problems:
        sys.exit(1)


@main.command()
@click.option("--shards", required=True, type=EXISTING_DIR, help="Shard folder written by avsprep crops.")
@click.option("--checkpoint", "checkpoints", required=True, multiple=True, type=EXISTING_FILE,
              help="avstrain checkpoint; repeat for side-by-side panels over the same crops.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="PNG to write.")
@click.option("--split", default="val", show_default=True)
@click.option("--max-points", default=20000, show_default=True, type=click.IntRange(5),
              help="Crops at most (a seeded uniform sample beyond).")
@click.option("--batch-size", default=256, show_default=True, type=click.IntRange(1))
@click.option("--perplexity", default=30.0, show_default=True, type=click.FloatRange(1, min_open=False))
@click.option("--iterations", default=500, show_default=True, type=click.IntRange(250))
@click.option("--seed", default=0, show_default=True, type=int)
@exits_cleanly_on_bad_input
def tsne(shards, checkpoints, out, split, max_points, batch_size, perplexity, iterations, seed):
    """t-SNE of crop embeddings coloured by class, with the silhouette score of the classes."""
    from avsprep.tsne import TSNESettings, run_tsne

    settings = TSNESettings(split=split, max_points=max_points, batch_size=batch_size, seed=seed,
                            perplexity=perplexity, iterations=iterations)
    bar = ProgressBar("embedding crops")
    try:
        result = run_tsne(list(checkpoints), shards, out, settings,
                          on_sample=lambda sample: bar(0, len(sample.labels) * len(checkpoints)),
                          progress=lambda n: bar(n, 0))
    finally:
        bar.close()
    for panel in result.panels:
        scores = [f"{name} {value:.3f}" if value is not None else f"{name} n/a"
                  for name, value in (("t-SNE", panel.silhouette_2d), ("features", panel.silhouette_features))]
        click.echo(f"{panel.name}: {panel.features}; silhouette of the classes: {', '.join(scores)}; "
                   f"embedding {panel.embed_seconds:.1f} s, PCA + t-SNE {panel.tsne_seconds:.1f} s")
    click.echo(f"wrote {result.out}: {len(result.sample.labels)} crops of {result.sample.clips} clips "
               f"(split {split}) in {result.seconds:.1f} s")


@main.command()
@click.option("--voc", type=EXISTING_DIR, help="labelImg Pascal VOC XML folder (searched recursively).")
@click.option("--yolo", type=EXISTING_DIR, help="labelImg YOLO txt folder with classes.txt.")
@click.option("--images", type=EXISTING_DIR, help="Frames, found by file name recursively (default: next to the XML).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder of PNG sheets.")
@click.option("--classes", type=EXISTING_FILE, help="Class list, one name per line (fixes the colours).")
@click.option("--clip-pattern", default="<clip>_<k>", show_default=True)
@click.option("--frames-per-clip", default=5, show_default=True, type=click.IntRange(1))
@click.option("--pad-short-clips", is_flag=True)
@click.option("--trust-xml-paths", is_flag=True, help="Allow reading frames from the XML's <path>.")
@click.option("--height", default=180, show_default=True, type=click.IntRange(16), help="Frame height on the sheet.")
@click.option("--max-clips", default=0, show_default=True, type=click.IntRange(0), help="0: every clip.")
@exits_cleanly_on_bad_input
def preview(voc, yolo, images, out, classes, clip_pattern, frames_per_clip, pad_short_clips, trust_xml_paths,
            height, max_clips):
    """Boxes and class names over the frames: one contact sheet per clip, for checking annotations."""
    from avsprep.clips import SourceOptions
    from avsprep.preview import PreviewSettings, write_previews

    options = SourceOptions(voc=voc, yolo=yolo, images=images, classes=classes, trust_xml_paths=trust_xml_paths,
                            clip_pattern=clip_pattern, frames_per_clip=frames_per_clip,
                            pad_short_clips=pad_short_clips)
    settings = PreviewSettings(height=height, max_clips=max_clips)
    bar = ProgressBar("previews")
    try:
        result = write_previews(options, out, settings, progress=bar)
    finally:
        bar.close()
    click.echo(f"wrote {len(result.written)} contact sheets to {out} ({result.boxes} boxes, "
               f"{result.frames_without_annotation} frames without annotation)")
    if result.problems:
        click.echo(f"{len(result.problems)} clips not drawn:")
        for clip, problem in result.problems.items():
            click.echo(f"  {clip}: {problem}")


if __name__ == "__main__":
    main()
