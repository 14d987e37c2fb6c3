"""tools/generalise.py and tools/compare_localisers.py reuse the runs a committed summary records (a later session
may be on a new machine without the run folders), but only for the same recipe: the same config content, schedule
and overrides (and for generalise clips and frame size)."""
from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def generalise(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "tools"))
    return importlib.import_module("generalise")


@pytest.fixture()
def compare_localisers(monkeypatch):
    monkeypatch.chdir(REPO)  # the tool names its configs relative to the repository
    monkeypatch.syspath_prepend(str(REPO / "tools"))
    return importlib.import_module("compare_localisers")


def _figures(miou: float) -> dict:
    return {"miou": miou, "swap_miou": miou - 0.01, "fpr_silence": 0.0, "fpr_noise": 0.01, "fpr_offscreen": 0.02,
            "seconds": 1.0}


def _main(generalise, monkeypatch, tmp_path: Path, config: Path, *extra: str) -> None:
    monkeypatch.setattr(sys, "argv", ["generalise.py", "--config", str(config), "--summary",
                                      str(tmp_path / "summary.json"), "--runs", str(tmp_path / "runs"),
                                      "--data", str(tmp_path / "data"), *extra])
    generalise.main()


def test_recorded_runs_are_reused_without_data_or_training(generalise, monkeypatch, tmp_path):
    config = tmp_path / "cpu.toml"
    config.write_text("[optim]\nepochs = 3\n")
    args = type("Args", (), {"config": config, "epochs": 2, "clips": None, "size": 224})()
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({**generalise.recipe(args), "runs": {
        "style1-s0": _figures(0.9), "style1-s1": _figures(0.8), "hard-s0": _figures(0.7)}}))
    monkeypatch.setattr(generalise, "prepare", lambda *a: pytest.fail("prepared data for a recorded run"))
    monkeypatch.setattr(generalise, "run_dataset", lambda *a: pytest.fail("trained a recorded run"))
    _main(generalise, monkeypatch, tmp_path, config, "--epochs", "2", "--datasets", "style1",
          "--second-seed-on", "style1")
    written = json.loads(summary.read_text())
    assert set(written["runs"]) == {"style1-s0", "style1-s1", "hard-s0"}  # an earlier call's hard run stays
    assert written["datasets"]["style1"]["seeds"] == [0, 1]
    assert written["datasets"]["style1"]["miou"]["mean"] == pytest.approx(0.85)
    assert "| hard | 1 | 0.700 |" in written["table"]
    assert (tmp_path / "summary.md").read_text() == written["table"]


def test_another_recipe_is_not_reused(generalise, monkeypatch, tmp_path):
    config = tmp_path / "cpu.toml"
    config.write_text("[optim]\nepochs = 3\n")
    args = type("Args", (), {"config": config, "epochs": 2, "clips": None, "size": 224, "summary":
                             tmp_path / "summary.json"})()
    (tmp_path / "summary.json").write_text(json.dumps({**generalise.recipe(args), "runs": {"style1-s0": _figures(0.9)}}))
    assert set(generalise.recorded_runs(args)) == {"style1-s0"}
    config.write_text("[optim]\nepochs = 4\n")  # same file name, another recipe
    assert generalise.recorded_runs(args) == {}
    config.write_text("[optim]\nepochs = 3\n")
    args.epochs = 3
    assert generalise.recorded_runs(args) == {}


def test_compare_localisers_reuses_recorded_runs_of_its_recipe(compare_localisers, monkeypatch, tmp_path):
    tool = compare_localisers
    args = type("Args", (), {"epochs": None, "tpavi_epochs": 8, "set": [], "summary_dir": tmp_path})()
    ceiling = {"ciou": 0.0, "auc": 0.14, "mean_ciou": 0.141}
    result = {"kind": "avolnet", "true": {"pointing": 0.8, "ceiling": ceiling}, "avc": {"accuracy": 0.9},
              "seconds": 1.0}
    (tmp_path / "summary.json").write_text(json.dumps({**tool.recipe(args), "runs": {"avolnet-s0": result}}))
    assert tool.recorded_runs(args) == {"avolnet-s0": result}
    monkeypatch.setattr(tool, "run_variant", lambda *a: pytest.fail("trained a recorded run"))
    monkeypatch.setattr(sys, "argv", ["compare_localisers.py", "--shards", str(tmp_path), "--summary-dir",
                                      str(tmp_path), "--variants", "avolnet", "--seeds", "0"])
    tool.main()
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["runs"] == {"avolnet-s0": result}  # recorded for the next call, by variant and seed
    assert written["rows"]["avolnet"]["values"]["true.pointing"] == [0.8]
    assert "| avolnet | 0% | 0.800 |" in (tmp_path / "table.md").read_text()
    assert "A perfect localiser scores cIoU 0.000, AUC 0.140 and mean cIoU 0.141" in (tmp_path / "table.md").read_text()
    args.epochs = 3  # another schedule: nothing recorded applies
    assert tool.recorded_runs(args) == {}
