"""Convert a released AVSBench checkpoint (S4_best.pth, MS3_best.pth) into an avs-toolkit checkpoint.

The result is what `avstrain train` writes (format, model, config, classes; no optimiser state), loads with
`torch.load(..., weights_only=True)`, and works with `avstrain eval` and `avstrain predict` without --format:

    .venv/bin/python tools/convert_avsbench_checkpoint.py S4_best.pth runs/avsbench-s4/best.pt \\
        --config configs/avsbench-s4-r50.toml

The model is built from --config (default: the S4 recipe, ResNet-50, C = 256, TPAVI at all four stages) with
`model.backbone_weights` ignored: every tensor comes from the checkpoint. Exit code 2 and one line on bad input.
"""
from __future__ import annotations

from pathlib import Path

import click

from avsprep.cli_support import command, configure_logging
from avstrain.config import ConfigError


@command("convert_avsbench_checkpoint", ConfigError)
@click.argument("source", type=click.Path(path_type=Path))
@click.argument("target", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="TOML config of the model (configs/avsbench-s4-r50.toml, configs/avsbench-ms3-r50.toml).")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="Override a config field.")
def main(source: Path, target: Path, config_path: Path | None, overrides: tuple[str, ...], verbose: bool) -> None:
    """Write the AVSBench checkpoint SOURCE as the avs-toolkit checkpoint TARGET."""
    configure_logging(verbose)
    from avstrain.avsbench import convert_avsbench_checkpoint
    from avstrain.config import load_config

    written = convert_avsbench_checkpoint(source, target, load_config(config_path, list(overrides)))
    model = written["config"]["model"]
    click.echo(f"wrote {target} ({model['backbone']}, C={model['channels']}, TPAVI stages {model['tpavi_stages']}) "
               f"from {source}")


if __name__ == "__main__":
    main()
