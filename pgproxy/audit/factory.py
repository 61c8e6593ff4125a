"""Build the audit sink the config asks for: the JSON-lines file or the signed log."""

from __future__ import annotations

from ..config import AuditConfig, ConfigError
from .keys import KeyError_, load_private_key
from .sink import AuditSink, AuditUnavailable, JsonLinesAuditSink


def sink_from_config(cfg: AuditConfig) -> AuditSink:
    if cfg.dir is not None:
        from .signed import SignedAuditLog
        from .witness import open_witness

        if cfg.signing_key_file is None:
            raise ConfigError("audit.signing_key_file: required with dir")
        try:
            key = load_private_key(cfg.signing_key_file)
        except KeyError_ as exc:
            raise ConfigError(f"audit.signing_key_file: {exc}") from None
        try:
            return SignedAuditLog(cfg.dir, key, checkpoint_every_records=cfg.checkpoint_every_records,
                                  checkpoint_every_seconds=cfg.checkpoint_every_seconds, fsync=cfg.fsync,
                                  segment_max_bytes=cfg.segment_max_bytes,
                                  witness=open_witness(cfg.witness_dir, cfg.witness_dsn),
                                  max_result_rows=cfg.max_result_rows, trusted_keys=cfg.trusted_keys)
        except (OSError, AuditUnavailable, KeyError_) as exc:
            raise ConfigError(f"audit.dir: {exc}") from None
    if cfg.jsonl_path is not None:
        return JsonLinesAuditSink(cfg.jsonl_path)
    raise ConfigError("audit: set jsonl_path or dir: the proxy does not run statements it cannot record")
