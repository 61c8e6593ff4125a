"""Dependencies point one way: the import-linter contracts in pyproject.toml hold for the code.

The layers (top to bottom): cli, demo/testing, app, server, the feature packages, core, protocol; the
leaf modules (config, metrics, ...) import none of them. Each exception is listed, with its reason, in
pyproject.toml; an exception that no longer matches an import fails too (import-linter's default).
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = ROOT / "pyproject.toml"
# In a process of its own: import-linter reconfigures logging, which other tests' log captures rely on.
_LINT = ("import sys; from importlinter.cli import lint_imports; "
         "sys.exit(lint_imports(config_filename=sys.argv[1], no_cache=True, no_logo=True))")


def lint_imports(config: Path) -> tuple[int, str]:
    done = subprocess.run([sys.executable, "-c", _LINT, str(config)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, check=False)
    return done.returncode, done.stdout + done.stderr


def test_every_import_follows_the_contracts() -> None:
    status, out = lint_imports(PYPROJECT)
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


def test_an_upward_import_breaks_the_layers(tmp_path: Path) -> None:
    """Without its listed exceptions the layers contract reports the real upward imports it excuses."""
    settings = tomllib.loads(PYPROJECT.read_text())["tool"]["importlinter"]
    layers = next(c for c in settings["contracts"] if c["id"] == "layers")
    config = tmp_path / "contracts.ini"
    config.write_text("[importlinter]\nroot_package = pgproxy\nexclude_type_checking_imports = True\n\n"
                      + _ini({k: v for k, v in layers.items() if k != "ignore_imports"}) + "\n")
    status, out = lint_imports(config)
    assert status == 1
    assert "BROKEN" in out
    assert "pgproxy.audit.replay -> pgproxy.server.upstream" in out
