"""Dependencies point one way: the import-linter contracts in pyproject.toml hold for the code.

The layers (top to bottom): cli, demo/testing, app, server, the feature packages, core, protocol; the
leaf modules (config, metrics, ...) import none of them. Each exception is listed, with its reason, in
pyproject.toml; an exception that no longer matches an import fails too (import-linter's default).
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = ROOT / "pyproject.toml"


def test_every_import_follows_the_contracts(capsys: pytest.CaptureFixture[str]) -> None:
    status = lint_imports(config_filename=str(PYPROJECT), no_cache=True, no_logo=True)
    out = capsys.readouterr().out
    assert status == 0, out
    assert "0 broken" in out


def _ini(contract: dict[str, object]) -> str:
    lines = [f"[importlinter:contract:{contract['id']}]"]
    for key, value in contract.items():
        if key == "id":
            continue
        if isinstance(value, list):
            lines.append(f"{key} =" + "".join(f"\n    {item}" for item in value))
        else:
            lines.append(f"{key} = {value}")
    return "\n".join(lines)


def test_an_upward_import_breaks_the_layers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Without its listed exceptions the layers contract reports the real upward imports it excuses."""
    settings = tomllib.loads(PYPROJECT.read_text())["tool"]["importlinter"]
    layers = next(c for c in settings["contracts"] if c["id"] == "layers")
    config = tmp_path / "contracts.ini"
    config.write_text("[importlinter]\nroot_package = pgproxy\nexclude_type_checking_imports = True\n\n"
                      + _ini({k: v for k, v in layers.items() if k != "ignore_imports"}) + "\n")
    status = lint_imports(config_filename=str(config), no_cache=True, no_logo=True)
    out = capsys.readouterr().out
    assert status == 1
    assert "BROKEN" in out
    assert "pgproxy.audit.replay -> pgproxy.server.upstream" in out
