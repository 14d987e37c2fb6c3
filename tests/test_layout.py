"""The README's layout table names every module of the two packages, every tool and every config."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def layout_rows() -> dict[str, str]:
    section = ROOT.joinpath("README.md").read_text(encoding="utf-8").split("## Layout", 1)[1]
    rows = re.findall(r"^\| `([^`]+)/` \| (.+) \|$", section, flags=re.MULTILINE)
    return dict(rows)


def test_every_module_tool_and_config_is_in_the_layout_table():
    rows = layout_rows()
    missing = []
    for package in ("avsprep", "avstrain"):
        for module in (ROOT / package).rglob("*.py"):
            if module.stem.startswith("__"):
                continue
            if f"`{module.stem}`" not in rows[package] and f"`{module.stem}:" not in rows[package]:
                missing.append(str(module.relative_to(ROOT)))
    for tool in (ROOT / "tools").iterdir():
        if tool.suffix in (".py", ".sh") and f"`{tool.name}`" not in rows["tools"]:
            missing.append(str(tool.relative_to(ROOT)))
    configs = rows["configs"]
    for config in (ROOT / "configs").glob("*.toml"):
        names = set(re.findall(r"`([^`]+\.toml)`", configs))
        for pattern in re.findall(r"`([^`]*\{[^`]*\}[^`]*\.toml)`", configs):
            head, options, tail = re.match(r"(.*)\{(.*)\}(.*)", pattern).groups()
            names |= {head + option + tail for option in options.split(",")}
        if config.name not in names:
            missing.append(str(config.relative_to(ROOT)))
    assert not missing, f"not in the README's layout table: {missing}"
