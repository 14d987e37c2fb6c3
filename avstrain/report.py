"""One self-contained HTML page per run: `runs/<name>/report.html` (`avstrain report runs/x/`).

It gathers what the run folder holds: the resolved config, the per-epoch validation table (of the metric that
chooses the model kind's `best.pt`), every evaluation (`eval-*.json`), the audio-reliance suite (`reliance.json`)
and the localisation suite (`localisation.json`) as tables, the training curves (`curves.png`,
drawn by `avstrain.plot` when missing), the t-SNE picture(s) (`tsne*.png`) and the overlay grids
(`**/overlays/*.png`, from `avstrain predict --overlays N --out runs/<name>/...`). Images are embedded as base64
data URIs, so the page can be mailed or archived alone. A small inline script counts the images that loaded
(`data-images-loaded` on <body>); the tests read it from headless Chromium where it is installed.
"""
from __future__ import annotations

import base64
import html
import json
import logging
import tomllib
from pathlib import Path

from avsprep.errors import InputError
from avstrain.evaluate import format_table
from avstrain.plot import plot_run, read_jsonl

log = logging.getLogger(__name__)

MAX_OVERLAYS = 8

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.9em; } td, th { padding: 2px 10px; text-align: right; }
th { background: #f0f0f0; } td:first-child, th:first-child { text-align: left; }
pre { background: #f7f7f7; padding: 0.8em; font-size: 0.85em; overflow-x: auto; }
img { max-width: 100%; border: 1px solid #eee; } figure { margin: 1em 0; } figcaption { font-size: 0.85em; color: #555; }
"""

# Counts the images that decoded (naturalWidth > 0) once the page has loaded: a check that needs no screenshot.
SCRIPT = """
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  document.body.setAttribute("data-images", String(images.length));
  document.body.setAttribute("data-images-loaded",
    String(images.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length));
});
"""


def data_uri(path: Path) -> str:
    """A PNG (or JPEG) file as a base64 data URI."""
    kind = "jpeg" if path.suffix.lower() in (".jpg", ".jpeg") else "png"
    return f"data:image/{kind};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _figure(path: Path, caption: str) -> str:
    return (f'<figure><img src="{data_uri(path)}" alt="{html.escape(path.name)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "-" if value is None else html.escape(str(value))


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _validation_metric(run_dir: Path) -> str:
    """The dotted path of the run's validation metric: its kind's `best_metric` (config.toml; tpavi's mIoU)."""
    from avstrain.config import ConfigError
    from avstrain.models import get_kind

    config = run_dir / "config.toml"
    try:
        kind = tomllib.loads(config.read_text(encoding="utf-8")).get("model", {}).get("kind", "tpavi")
        return get_kind(kind).best_metric
    except (OSError, tomllib.TOMLDecodeError, ConfigError):
        return "overall.miou"


def _value(epoch: dict, metric: str) -> float | None:
    from avstrain.train import metric_value

    try:
        return metric_value(epoch.get("val", {}), metric)
    except (KeyError, TypeError):
        return None


def _epoch_table(metrics: list[dict], metric: str) -> str:
    if metric != "overall.miou":  # another kind: its own metric only
        return _table(["epoch", "step", f"val {metric}", "train s", "clips/s"],
                      [[m.get("epoch"), m.get("step"), _value(m, metric), *(
                          f"{m[key]:.1f}" if isinstance(m.get(key), (int, float)) else None
                          for key in ("train_seconds", "clips_per_second"))] for m in metrics])
    rows = []
    for m in metrics:
        overall = m.get("val", {}).get("overall", {})
        rows.append([m.get("epoch"), m.get("step"), overall.get("miou"), overall.get("f"), overall.get("f_avsbench"),
                     *(f"{m[key]:.1f}" if isinstance(m.get(key), (int, float)) else None
                       for key in ("train_seconds", "clips_per_second"))])
    return _table(["epoch", "step", "val mIoU", "val F", "val F_avsbench", "train s", "clips/s"], rows)


def _result_section(path: Path) -> str:
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
        text = format_table(results)
    except (ValueError, AttributeError, TypeError) as error:
        log.warning("%s: not an evaluation result (%s); left out of the report", path, error)
        return ""
    return f"<h3>{html.escape(path.name)}</h3><pre>{html.escape(text)}</pre>"


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write `run_dir/report.html` (or `out`) from the run folder's files; returns its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(run_dir, "run folder does not exist")
    out = Path(out) if out is not None else run_dir / "report.html"
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    curves = run_dir / "curves.png"
    if not curves.exists() and (run_dir / "steps.jsonl").exists():
        plot_run(run_dir, curves)

    parts = [f"<h1>Run {html.escape(run_dir.name)}</h1>"]
    metric = _validation_metric(run_dir)
    if metrics:
        best = max(metrics, key=lambda m: -1 if _value(m, metric) is None else _value(m, metric))
        seconds = sum(m.get("train_seconds", 0) for m in metrics)
        name = "mIoU" if metric == "overall.miou" else metric
        parts.append(f"<p>{len(metrics)} validated epochs, {metrics[-1].get('step')} steps, "
                     f"{seconds / 60:.1f} min of training; best validation {html.escape(name)} "
                     f"<b>{_fmt(_value(best, metric))}</b> at epoch {best.get('epoch')} "
                     "(<code>best.pt</code>).</p>")
    else:
        parts.append("<p>No validation logged (metrics.jsonl is missing or empty).</p>")

    results = [path for pattern in ("eval-*.json", "reliance*.json", "localisation*.json")
               for path in sorted(run_dir.glob(pattern))]
    if results:
        parts.append("<h2>Evaluation</h2>")
        parts += [_result_section(path) for path in results]
    if curves.exists():
        parts += ["<h2>Training curves</h2>", _figure(curves, "loss parts per step, learning rate, validation "
                                                              "metrics per epoch")]
    tsne = sorted(run_dir.glob("tsne*.png"))
    if tsne:
        parts.append("<h2>t-SNE of crop embeddings</h2>")
        parts += [_figure(path, f"{path.name}: colours are classes; the silhouette score is in the panel title")
                  for path in tsne]
    overlays = sorted(p for p in run_dir.rglob("*.png") if p.parent.name == "overlays")
    if overlays:
        parts.append("<h2>Predictions</h2><p>Rows: frame; ground truth (sounding object green, other visible "
                     "object outlined orange); then for the clip's own audio, the other object's audio and silence: "
                     "the predicted mask (red; the object it should follow outlined) and the TPAVI heat map "
                     "(colour scale shared within a clip); a localiser draws its heat map alone, labelled with its "
                     "pointing game.</p>")
        parts += [_figure(path, str(path.relative_to(run_dir))) for path in overlays[:MAX_OVERLAYS]]
        if len(overlays) > MAX_OVERLAYS:
            parts.append(f"<p>{len(overlays) - MAX_OVERLAYS} more grids in the run folder.</p>")
    if metrics:
        parts += ["<h2>Validation per epoch</h2>", _epoch_table(metrics, metric)]
    if (run_dir / "config.toml").exists():
        parts += ["<h2>Config</h2>", f"<pre>{html.escape((run_dir / 'config.toml').read_text(encoding='utf-8'))}</pre>"]

    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(run_dir.name)} report</title><style>{STYLE}</style>"
            f"<script>{SCRIPT}</script></head>\n<body>\n" + "\n".join(p for p in parts if p) + "\n</body></html>\n")
    temporary = out.with_name(out.name + ".partial")
    temporary.write_text(page, encoding="utf-8")
    temporary.replace(out)
    log.info("wrote %s (%d kB)", out, len(page) // 1024)
    return out


__all__ = ["data_uri", "write_report"]
