"""The serve config: every limit and timeout of the query service, with its default.

``ServiceLimits`` is the one place these defaults live: ``python -m serve`` makes one
command-line flag per field (``--max-image-bytes`` ...) with the field's default and
help, the engine takes its image limits from it, and the app and uvicorn take the rest.
Every excess is answered with a 4xx or a 503 that names the limit.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field


def _limit(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ServiceLimits:
    """What one request may ask for, and how long and how many the service waits for."""

    max_image_bytes: int = _limit(10 * 1024 * 1024, "largest image upload, bytes")
    max_image_pixels: int = _limit(40_000_000, "largest image, pixels (read from its header)")
    max_image_side: int = _limit(16384, "longest image side, pixels")
    max_aspect_ratio: float = _limit(20.0, "most elongated image, long side / short side")
    max_text_chars: int = _limit(500, "longest modification text, characters")
    max_k: int = _limit(100, "most results one query may ask for")
    max_sample: int = _limit(100, "most ids GET /gallery/sample returns")
    concurrent_decodes: int = _limit(2, "uploads decoded at once")
    max_pending_uploads: int = _limit(
        8, "image uploads in flight (received, waiting or decoding); more get 503"
    )
    max_queue: int = _limit(1024, "queries waiting for the engine; more get 503")
    queue_timeout_s: float = _limit(10.0, "longest a query waits for the engine, then 503")
    body_timeout_s: float = _limit(15.0, "longest a request body may take to arrive, then 408")
    header_timeout_s: float = _limit(
        10.0, "longest a connection may take to send a request head, then it is closed"
    )
    keep_alive_s: int = _limit(5, "idle keep-alive connections are closed after this")
    max_connections: int = _limit(256, "open connections and requests at once; more get 503")

    def __post_init__(self) -> None:
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"ServiceLimits.{item.name} must be a number > 0, got {value!r}")
        if self.max_aspect_ratio < 1:
            raise ValueError(f"max_aspect_ratio must be >= 1, got {self.max_aspect_ratio}")

    @property
    def max_body_bytes(self) -> int:
        """Largest request body: the image, multipart framing and the form's text fields."""
        return self.max_image_bytes + BODY_OVERHEAD_BYTES + 4 * self.max_text_chars


# Multipart framing and the form's text fields, on top of the image itself.
BODY_OVERHEAD_BYTES = 64 * 1024


def add_limit_flags(parser: argparse.ArgumentParser) -> None:
    """One ``--flag`` per ``ServiceLimits`` field, with its default and help."""
    group = parser.add_argument_group("limits and timeouts (the serve config)")
    for item in dataclasses.fields(ServiceLimits):
        flag = "--" + item.name.replace("_", "-")
        kind = float if item.type in ("float", float) else int
        group.add_argument(
            flag,
            type=kind,
            default=item.default,
            help=f"{item.metadata['help']} (default {item.default})",
        )


def limits_from_args(args: argparse.Namespace) -> ServiceLimits:
    """The ``ServiceLimits`` that ``add_limit_flags``' flags say; ``ValueError`` names a bad one."""
    return ServiceLimits(
        **{item.name: getattr(args, item.name) for item in dataclasses.fields(ServiceLimits)}
    )
