"""`avsprep`: the command line of the preprocessing stages. It parses arguments and calls the library.

Each command fills the library's option dataclasses from options of the same names (`from_options`), so adding an
option is one `click.option` in the right set below and one dataclass field. Bad input from any command ends in one
line and exit code 2 (`avsprep.cli_support.CommandGroup`).
"""
from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path

import click

from avsprep.cli_support import command_group, configure_logging, progress

EXISTING_DIR = click.Path(exists=True, file_okay=False, path_type=Path)
EXISTING_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)
OUT_DIR = click.Path(file_okay=False, path_type=Path)


def option_set(*options: Callable) -> Callable:
    """A decorator applying several click options, in the order listed (the order `--help` shows them)."""

    def apply(command: Callable) -> Callable:
        for option in reversed(options):
            command = option(command)
        return command

    return apply


def from_options(options: dict, *types: type) -> list:
    """One instance of each dataclass in `types`, filled from the command's options of the same names (an option
    may fill fields of several). Every option must fill some field: a misspelt one would otherwise be ignored."""
    instances, used = [], set()
    for cls in types:
        names = {field.name for field in dataclasses.fields(cls)} & options.keys()
        used |= names
        instances.append(cls(**{name: options[name] for name in names}))
    unused = sorted(options.keys() - used)
    assert not unused, f"options {unused} fill no field of {[cls.__name__ for cls in types]}"
    return instances


FRAMES_PER_CLIP = click.option("--frames-per-clip", default=5, show_default=True, type=click.IntRange(1),
                               help="T, the frames of a clip.")

# Where boxes come from and what they may be called: `crops`, `avsbench` and `preview`.
annotation_options = option_set(
    click.option("--voc", type=EXISTING_DIR,
                 help="labelImg Pascal VOC XML folder (searched recursively; matched to frames by <filename>)."),
    click.option("--yolo", type=EXISTING_DIR,
                 help="labelImg YOLO txt folder with classes.txt (matched to frames by stem)."),
    click.option("--classes", type=EXISTING_FILE,
                 help="Class list, one name per line (e.g. labelImg classes.txt): fixes label numbers and colours. "
                      "Default: the sorted names in the annotations and metadata."),
)

# The JSON formats, read through clip discovery: `crops` and `preview`.
json_annotation_options = option_set(
    click.option("--createml", type=click.Path(exists=True, path_type=Path),
                 help="labelImg CreateML JSON: a file, or a folder of them (one per image, searched recursively)."),
    click.option("--coco", type=EXISTING_FILE,
                 help="COCO JSON (Label Studio, CVAT): images by file_name, also without Label Studio's hex prefix."),
    click.option("--max-json-mb", default=200.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
                 help="Refuse larger JSON files (a whole COCO export is one file)."),
)

# How frames are found and grouped into clips: `crops` and `preview`.
frame_options = option_set(
    click.option("--images", type=EXISTING_DIR, help="Frames, found by file name recursively (default: next to the XML)."),
    click.option("--trust-xml-paths", is_flag=True, help="Allow reading frames from the XML's <path>."),
    click.option("--clip-pattern", default="<clip>_<k>", show_default=True, help="How frame stems name clip and index."),
    FRAMES_PER_CLIP,
    click.option("--pad-short-clips", is_flag=True, help="Repeat the last frame of clips with fewer than T frames."),
)

# The shards a command writes: `crops` and `avsbench`.
shard_options = option_set(
    click.option("--out", required=True, type=OUT_DIR, help="Shard folder."),
    click.option("--size", default=224, show_default=True, type=click.IntRange(8), help="Frame and mask side."),
    click.option("--crop-size", default=224, show_default=True, type=click.IntRange(8), help="Crop side."),
    click.option("--max-boxes", default=4, show_default=True, type=click.IntRange(1)),
    click.option("--embedder", default="logmel-stats", show_default=True, type=click.Choice(["logmel-stats", "vggish"])),
    click.option("--vggish-weights", type=EXISTING_FILE, help="Local VGGish weights (public PyTorch port layout)."),
    click.option("--vggish-pca", type=EXISTING_FILE, help="Local VGGish PCA parameters: apply PCA postprocessing."),
    click.option("--clips-per-shard", default=64, show_default=True, type=click.IntRange(1)),
    click.option("--workers", default=1, show_default=True, type=click.IntRange(1), help="Processes."),
    click.option("--num-parts", default=1, show_default=True, type=click.IntRange(1), help="Split the work into K parts."),
    click.option("--part-index", default=0, show_default=True, type=click.IntRange(0), help="Which part this run writes."),
    click.option("--on-error", default="error", show_default=True, type=click.Choice(["error", "skip"]),
                 help="Stop at the first bad clip (exit 2), or skip bad clips and report them."),
    click.option("--compression", type=click.Choice(["gzip", "lzf"]), help="HDF5 compression (default: none)."),
)


def echo_crops_result(result, out: Path, heading: str = "", counted_extra: str = "") -> None:
    """What both shard-writing commands print: the clips and shards, the report counts, the skipped clips."""
    manifest = result.manifest
    click.echo(f"{heading}{manifest['clips']} clips in {len(manifest['shards'])} shards at {out} "
               f"({result.written} written, {result.reused} already complete); splits {manifest['splits']}")
    counted = {key: value for key, value in manifest["report"].items() if value}
    if counted:
        click.echo("report: " + ", ".join(f"{key} {value}" for key, value in counted.items()))
    if counted_extra:
        click.echo(counted_extra)
    if result.skipped:
        click.echo(f"skipped {len(result.skipped)} clips for bad input:")
        for skip in result.skipped:
            click.echo(f"  {skip['clip']}: {skip['error']}")


@command_group("avsprep")
def main(verbose: bool) -> None:
    """Audio-visual segmentation data preparation: labelImg/AVSBench inputs to HDF5 shards."""
    configure_logging(verbose)


@main.command()
@click.option("--out", required=True, type=OUT_DIR, help="Output folder.")
@click.option("--clips", default=600, show_default=True, type=click.IntRange(1))
@click.option("--num-classes", type=click.IntRange(3), help="Classes (default 5; with --sounds: its class folders).")
@click.option("--size", default=224, show_default=True, type=click.IntRange(32), help="Frame side in pixels.")
@click.option("--width", type=click.IntRange(32), help="Frame width (default: --size).")
@click.option("--height", type=click.IntRange(32), help="Frame height (default: --size).")
@click.option("--image-format", default="png", show_default=True, type=click.Choice(["png", "jpg"]),
              help="Frame files (masks are always PNG).")
@FRAMES_PER_CLIP
@click.option("--sources", default=1, show_default=True, type=click.IntRange(1, 2),
              help="Sounding objects per scene (2: MS3-style).")
@click.option("--difficulty", default="easy", type=click.Choice(["easy", "hard"]))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--yolo", is_flag=True, help="Also write labelImg YOLO txt files and classes.txt.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1))
@click.option("--style", default=0, show_default=True, type=click.IntRange(0),
              help="0: the default classes; N >= 1: a seeded family of other shapes, colours and sound types.")
@click.option("--sample-rate", default=16000, show_default=True, type=click.IntRange(8000, 192000),
              help="Of the WAVs.")
@click.option("--channels", default=1, show_default=True, type=click.IntRange(1, 8), help="Of the WAVs.")
@click.option("--sounds", type=EXISTING_DIR,
              help="One folder of WAV recordings per class: clips sound like them, test clips from the last 15 % "
                   "of each recording (train: first 70 %, val: next 15 %).")
@click.option("--semantic", is_flag=True,
              help="Write an AVSBench-semantic tree (metadata.csv, label2idx.json, v1s/v1m/v2 clips, colour masks) "
                   "for `avsprep avsbench --subset avss`.")
def synth(**options):
    """Generate synthetic AVS clips: two+ objects per scene, only the sounding one is the target."""
    from avsprep.synth import SynthConfig, generate
    from avsprep.synth_semantic import generate_semantic

    [config] = from_options(options, SynthConfig)
    with progress("synth clips", config.clips) as advance:
        summary = (generate_semantic if config.semantic else generate)(config, progress=advance)
    click.echo(f"wrote {summary.clips} clips to {config.out} in {summary.seconds:.1f} s; splits {summary.per_split}; "
               f"sounding classes {summary.per_class}")


@main.command()
@click.option("--videos", required=True, type=EXISTING_DIR, help="Folder of videos (mp4, mkv, webm, avi, mov; recursive).")
@click.option("--out", required=True, type=OUT_DIR, help="Output folder: frames/, audio/, meta.csv.")
@click.option("--clip-seconds", default=5, show_default=True, type=click.IntRange(1), help="T: seconds (frames) per clip.")
@click.option("--size", type=click.IntRange(8), help="Shorter side of the frames in pixels (default: the video's).")
@click.option("--pad-short-clips", is_flag=True, help="Keep a final clip of fewer seconds (crops needs the same flag).")
@click.option("--val-fraction", default=0.0, show_default=True, type=float, help="Share of videos for val.")
@click.option("--test-fraction", default=0.0, show_default=True, type=float, help="Share of videos for test.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the split.")
@click.option("--classes", type=EXISTING_FILE, help="Class list: written as labelImg's predefined_classes.txt.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1), help="Processes.")
@click.option("--on-error", default="error", show_default=True, type=click.Choice(["error", "skip"]),
              help="Stop at the first bad video (exit 2), or skip bad videos and report them.")
def frames(**options):
    """Videos -> one frame per second (<clip>_<k>.png) and 16 kHz mono WAV per clip, ready to annotate."""
    from avsprep.frames import FramesConfig, extract_clips

    [config] = from_options(options, FramesConfig)
    with progress("videos") as advance:
        result = extract_clips(config, progress=advance)
    report = result.report()
    click.echo(f"{report['clips']} clips of {config.clip_seconds} s from {report['videos']} videos at {config.out} "
               f"({report['clips_written']} written, {report['clips_kept']} already complete; "
               f"{report['dropped_seconds']} seconds after the last clips left out)")
    if result.skipped:
        click.echo(f"skipped {len(result.skipped)} videos for bad input:")
        for skip in result.skipped:
            click.echo(f"  {skip['video']}: {skip['error']}")
    click.echo(f"next: annotate {config.out / 'frames'} (labelImg, Label Studio, CVAT), then avsprep crops --images "
               f"{config.out / 'frames'} --audio {config.out / 'audio'} --meta {config.out / 'meta.csv'} "
               f"--frames-per-clip {config.clip_seconds} --voc/--createml/--coco ... --out SHARDS")


@main.command()
@annotation_options
@json_annotation_options
@frame_options
@click.option("--masks", type=EXISTING_DIR, help="Ground-truth masks, found by frame stem recursively.")
@click.option("--other-masks", type=EXISTING_DIR, help="Masks of the visible non-sounding object (swap test).")
@click.option("--audio", type=EXISTING_DIR, help="Audio, <clip>.wav found recursively.")
@click.option("--meta", type=EXISTING_FILE, help="Metadata CSV (name, category, split, other_category).")
@click.option("--val-fraction", default=0.0, show_default=True, type=float, help="Used when there is no --meta split.")
@click.option("--test-fraction", default=0.0, show_default=True, type=float)
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the --val/--test-fraction split.")
@shard_options
def crops(**options):
    """Annotations + frames + masks + audio -> HDF5 shards and manifest.json."""
    from avsprep.clips import SourceOptions, discover
    from avsprep.crops import CropsConfig, run_crops

    sources, config = from_options(options, SourceOptions, CropsConfig)
    with progress("clips") as advance:
        # A function, not its result: the worker processes start while it runs
        result = run_crops(lambda: discover(sources), config, progress=advance)
    echo_crops_result(result, config.out)


@main.command()
@click.option("--root", required=True, type=click.Path(path_type=Path),
              help="AVSBench download: the subset folder (Single-source/, Multi-sources/, AVSBench-semantic/) or "
                   "the one above them.")
@click.option("--subset", required=True, type=click.Choice(["s4", "ms3", "avss"]))
@click.option("--versions", default="v1s,v1m,v2", show_default=True,
              help="AVSS: the metadata labels to read (T = 10 always; 5-frame clips are padded).")
@annotation_options
@click.option("--boxes-from-masks", is_flag=True, help="One box per frame: the bounding box of its mask.")
@FRAMES_PER_CLIP
@shard_options
def avsbench(**options):
    """AVSBench S4 / MS3 folders (metadata CSV, visual_frames, gt_masks, audio_wav) or AVSS (metadata.csv,
    label2idx.json, <label>/<uid>/frames, labels_rgb, audio.wav) -> HDF5 shards."""
    from avsprep.avsbench import AvsbenchOptions, run_avsbench
    from avsprep.crops import CropsConfig

    avsbench_options, config = from_options(options, AvsbenchOptions, CropsConfig)
    with progress("clips") as advance:
        result = run_avsbench(avsbench_options, config, progress=advance)
    unmatched = result.unmatched_annotations
    echo_crops_result(result.crops, config.out, f"AVSBench {avsbench_options.subset.upper()} from {result.layout.meta.parent}: ",
                      f"{len(unmatched)} label files name no frame of the CSV's clips (first: {unmatched[0]})"
                      if unmatched else "")


@main.command()
@click.argument("parts", nargs=-1, required=True, type=EXISTING_DIR)
@click.option("--out", required=True, type=OUT_DIR, help="Merged shard folder.")
def merge(parts, out):
    """Join the folders of `crops --num-parts K --part-index i` runs into one, as a single run would have written."""
    from avsprep.shards import merge_parts

    manifest = merge_parts(list(parts), out)
    click.echo(f"{manifest['clips']} clips in {len(manifest['shards'])} shards at {out}; splits {manifest['splits']}")


@main.command()
@click.argument("shards", type=EXISTING_DIR)
@click.option("--verify", is_flag=True, help="Recheck checksums and shapes; exit 1 on any mismatch.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def inspect(shards, verify, as_json):
    """Clips per split and class, shapes, dtypes, embedder, sizes on disk."""
    from avsprep.shards import summarize, verify as verify_shards

    summary = summarize(shards, skip_unreadable=verify)
    problems = None
    if verify:
        with progress("verifying shards", summary["shards"]) as advance:
            problems = verify_shards(shards, progress=advance)
        summary["verify"] = {"ok": not problems, "problems": problems}
    if as_json:
        click.echo(json.dumps(summary, indent=1, ensure_ascii=False))
    else:
        echo_summary(summary, problems)
    if problems:
        sys.exit(1)


def echo_summary(summary: dict, problems: list[str] | None) -> None:
    """`avsprep inspect` without --json."""
    click.echo(f"schema version {summary['schema_version']}: "
               f"{summary['clips']} clips in {summary['shards']} shards, "
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
def tsne(shards, checkpoints, out, **options):
    """t-SNE of crop embeddings coloured by class, with the silhouette score of the classes."""
    from avsprep.tsne import TSNESettings, run_tsne

    [settings] = from_options(options, TSNESettings)
    with progress("embedding crops") as advance:
        result = run_tsne(list(checkpoints), shards, out, settings, progress=advance)
    for panel in result.panels:
        scores = [f"{name} {value:.3f}" if value is not None else f"{name} n/a"
                  for name, value in (("t-SNE", panel.silhouette_2d), ("features", panel.silhouette_features))]
        click.echo(f"{panel.name}: {panel.features}; silhouette of the classes: {', '.join(scores)}; "
                   f"embedding {panel.embed_seconds:.1f} s, PCA + t-SNE {panel.tsne_seconds:.1f} s")
    click.echo(f"wrote {result.out}: {len(result.sample.labels)} crops of {result.sample.clips} clips "
               f"(split {settings.split}) in {result.seconds:.1f} s")


@main.command()
@annotation_options
@json_annotation_options
@frame_options
@click.option("--out", required=True, type=OUT_DIR, help="Folder of PNG sheets.")
@click.option("--height", default=180, show_default=True, type=click.IntRange(16), help="Frame height on the sheet.")
@click.option("--max-clips", default=0, show_default=True, type=click.IntRange(0), help="0: every clip.")
def preview(out, **options):
    """Boxes and class names over the frames: one contact sheet per clip, for checking annotations."""
    from avsprep.clips import SourceOptions
    from avsprep.preview import PreviewSettings, write_previews

    sources, settings = from_options(options, SourceOptions, PreviewSettings)
    with progress("previews") as advance:
        result = write_previews(sources, out, settings, progress=advance)
    click.echo(f"wrote {len(result.written)} contact sheets to {out} ({result.boxes} boxes, "
               f"{result.frames_without_annotation} frames without annotation)")
    if result.problems:
        click.echo(f"{len(result.problems)} clips not drawn:")
        for clip, problem in result.problems.items():
            click.echo(f"  {clip}: {problem}")


if __name__ == "__main__":
    main()
