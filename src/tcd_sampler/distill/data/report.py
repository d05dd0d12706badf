"""The one policy for bad data: :data:`REASONS` a sample is skipped, the :class:`DataReport` that counts them with
examples, and the :class:`DataError` a source stops with."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

log = logging.getLogger(__package__)  # the package's logger: tcd_sampler.distill.data

REASONS: dict[str, str] = {
    "unreadable_image": "the image cannot be opened or decoded",
    "too_small": "the image's shorter side is below min_size",
    "missing_caption": "no usable caption: none, empty, or not text",
    "missing_image": "a caption or metadata record without its image",
    "bad_metadata": "a metadata.jsonl line that is not a JSON object with a 'file_name'",
    "unreadable_shard": "a shard that cannot be read as a tar file (the rest of it is lost)",
}
"""The reasons a sample is skipped, in report order, with the rule each stands for."""

_MAX_EXAMPLES = 3


class DataError(ValueError):
    """Bad data or a bad source: one clear message naming the file or folder and the rule it broke.

    A DataLoader worker's exception reaches the main process as ``type(err)(text)`` with the worker's whole traceback
    in ``text``; this class takes the original message back out of it, so the error the training loop sees reads as
    it was raised. The worker's text is kept in :attr:`worker_traceback` (None for an error raised in-process).

    Args:
        message: the message.
    """

    worker_traceback: str | None

    def __init__(self, message: str) -> None:
        self.worker_traceback = None
        name = type(self).__name__
        if isinstance(message, str) and message.startswith(f"Caught {name} ") and "\nOriginal Traceback" in message:
            marker = f"\n{type(self).__module__}.{type(self).__qualname__}: "
            at = message.rfind(marker)
            if at >= 0:
                self.worker_traceback = message
                message = message[at + len(marker) :].rstrip("\n")
        super().__init__(message)


class _Bad(Exception):
    """A bad sample found while reading: its reason (a key of :data:`REASONS`) and what exactly is wrong."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def _describe(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".replace("\n", " ")
    return text if len(text) <= 160 else text[:157] + "..."


def _percent(fraction: float) -> str:
    return f"{100.0 * fraction:.3g}%"


@dataclass
class DataReport:
    """What a source held: how many samples it had, how many are used, and the skipped ones by reason with a few
    example locations (a path, ``metadata.jsonl:LINE``, or ``SHARD:MEMBER``).

    Attributes:
        kind: the source kind (one of :data:`SOURCES`).
        source: the folder, or the shards as given.
        max_bad_fraction: the threshold the report is checked against.
        total: samples seen (used + skipped).
        used: samples that pass.
        skipped: the number of skipped samples by reason (keys of :data:`REASONS`).
        examples: up to three example locations a reason, each with what is wrong.
    """

    kind: str
    source: str
    max_bad_fraction: float
    total: int = 0
    used: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def record_used(self) -> None:
        """Count one usable sample."""
        self.total += 1
        self.used += 1

    def record_bad(self, reason: str, where: str, detail: str = "") -> None:
        """Count one skipped sample.

        Args:
            reason: a key of :data:`REASONS`.
            where: the file (or ``metadata.jsonl:LINE``, ``SHARD:MEMBER``) it concerns.
            detail: what exactly is wrong, shown with the example.
        """
        if reason not in REASONS:
            raise ValueError(f"reason must be one of {tuple(REASONS)}, got {reason!r}")
        self.total += 1
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < _MAX_EXAMPLES:
            examples.append(f"{where} ({detail})" if detail else where)

    @property
    def skipped_total(self) -> int:
        """The number of skipped samples, all reasons together."""
        return sum(self.skipped.values())

    @property
    def bad_fraction(self) -> float:
        """Skipped samples as a fraction of all samples seen (0 when none was seen)."""
        return self.skipped_total / self.total if self.total else 0.0

    @property
    def exceeds(self) -> bool:
        """Whether the bad fraction is above ``max_bad_fraction``."""
        return self.bad_fraction > self.max_bad_fraction

    def _reason_lines(self) -> list[str]:
        lines = []
        for reason, rule in REASONS.items():
            count = self.skipped.get(reason, 0)
            if count:
                lines.append(f"  {reason} ({rule}): {count}, e.g. " + "; ".join(self.examples.get(reason, [])))
        return lines

    def summary(self) -> str:
        """The report as text: one line of counts, then a line a reason with examples."""
        head = (
            f"{self.kind} {self.source}: {self.used} of {self.total} samples used, {self.skipped_total} skipped "
            f"({_percent(self.bad_fraction)}; max_bad_fraction {self.max_bad_fraction:g})"
        )
        return "\n".join([head, *self._reason_lines()])

    def check(self, *, empty_hint: str = "", scope: str = "") -> None:
        """Stop with one :class:`DataError` if the source is empty, has nothing usable, or has more bad samples than
        ``max_bad_fraction`` allows.

        Args:
            empty_hint: what was looked for, said when nothing was found.
            scope: where the counts come from, when not the whole source (e.g. a stream so far).

        Raises:
            DataError: the counts by reason and examples, and what to do.
        """
        where = f"{self.kind} {self.source}{scope}"
        if self.total == 0:
            raise DataError(f"{where}: no samples found" + (f" ({empty_hint})" if empty_hint else ""))
        if self.used == 0 or self.exceeds:
            if self.used == 0:
                head = f"{where}: none of the {self.total} samples is usable"
            else:
                head = (
                    f"{where}: {self.skipped_total} of {self.total} samples are bad ({_percent(self.bad_fraction)}), "
                    f"above max_bad_fraction={self.max_bad_fraction:g}"
                )
            tail = "fix or remove these files, or raise max_bad_fraction to skip them"
            raise DataError("\n".join([head + ":", *self._reason_lines(), tail]))
