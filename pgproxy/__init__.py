"""pgproxy: an identity-aware PostgreSQL gateway for LLM agents and SQL tools."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("pgproxy")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
