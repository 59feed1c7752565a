"""Draft policies: which sub-layers the draft skips and which weights it runs on."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

DraftPrecision = Literal["full", "int8", "int4"]
DRAFT_PRECISIONS: tuple[str, ...] = ("full", "int8", "int4")
MAX_DRAFT_LIMIT = 16  # KV buffers reserve this many positions beyond the committed length


@dataclass(frozen=True)
class SkipSet:
    """Decoder sub-layers the draft treats as identity on the residual stream.

    ``attention`` and ``mlp`` hold layer indices. A skipped attention sub-layer
    neither reads nor writes the KV cache.
    """

    attention: frozenset[int] = field(default_factory=frozenset)
    mlp: frozenset[int] = field(default_factory=frozenset)

    def __init__(self, attention: Any = (), mlp: Any = ()) -> None:
        object.__setattr__(self, "attention", frozenset(_as_indices(attention, "attention")))
        object.__setattr__(self, "mlp", frozenset(_as_indices(mlp, "mlp")))

    def __len__(self) -> int:
        return len(self.attention) + len(self.mlp)

    def validate(self, num_layers: int) -> "SkipSet":
        """Raise ``ValueError`` if an index does not name a layer of a ``num_layers`` model."""
        for kind, indices in (("attention", self.attention), ("mlp", self.mlp)):
            bad = sorted(i for i in indices if not 0 <= i < num_layers)
            if bad:
                raise ValueError(
                    f"skip set {kind} indices {bad} out of range: "
                    f"the model has {num_layers} layers (0..{num_layers - 1})"
                )
        return self

    def fraction(self, num_layers: int) -> float:
        """Share of the 2 * num_layers sub-layers that are skipped."""
        return len(self) / (2 * num_layers)

    def to_dict(self) -> dict[str, list[int]]:
        return {"attention": sorted(self.attention), "mlp": sorted(self.mlp)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SkipSet":
        return cls(data.get("attention", ()), data.get("mlp", ()))


def _as_indices(values: Any, kind: str) -> list[int]:
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"skip set {kind} indices must be integers, got {v!r}")
        out.append(v)
    return out


# The built-in speculative shape (no skips, no early stop, 12 tokens; the server adds the 4-bit or int8
# draft copy): what calibration chose for every domain of the default model on CPU. With a quantised draft
# far cheaper than a full step, stopping at low confidence costs more than it saves, and the 4-bit drafts
# are accepted often enough that 12 tokens pay (docs/measurements.md, "Why the code is as it is").
DEFAULT_THRESHOLD, DEFAULT_MAX_DRAFT = 0.0, 12


@dataclass(frozen=True)
class DraftPolicy:
    """How one request drafts: skip set, draft weight precision, early stop and draft length.

    ``speculative`` False means plain autoregressive decoding (the baseline). ``lookup`` first tries
    a draft by n-gram lookup in the prompt and the output so far (``decoding.lookup``: no forward
    pass); a step where nothing matches drafts with the model (skips and precision) as usual.
    """

    skip: SkipSet = field(default_factory=SkipSet)
    precision: DraftPrecision = "full"
    threshold: float = DEFAULT_THRESHOLD
    max_draft: int = DEFAULT_MAX_DRAFT
    speculative: bool = True
    lookup: bool = False

    def __post_init__(self) -> None:
        if self.precision not in DRAFT_PRECISIONS:
            raise ValueError(f"draft precision must be one of {DRAFT_PRECISIONS}, got {self.precision!r}")
        if not 0.0 <= self.threshold < 1.0:
            raise ValueError(f"draft threshold must be in [0, 1), got {self.threshold}")
        if not 1 <= self.max_draft <= MAX_DRAFT_LIMIT:
            raise ValueError(f"max_draft must be in [1, {MAX_DRAFT_LIMIT}], got {self.max_draft}")

    @property
    def drafts_with_model(self) -> bool:
        """Whether the model drafts (skipping sub-layers or on a quantised copy). A full-precision draft
        that skips nothing is the model itself: drafting with it would only double the work."""
        return self.speculative and (self.precision != "full" or len(self.skip) > 0)

    @property
    def is_plain(self) -> bool:
        """True when the policy decodes without speculation (no model draft and no lookup)."""
        return not self.drafts_with_model and not (self.speculative and self.lookup)

    def validate(self, num_layers: int) -> "DraftPolicy":
        self.skip.validate(num_layers)
        return self

    def describe(self) -> str:
        """The policy in words, for logs and tables: ``int4 draft, skip attention [3] mlp [], threshold 0.0,
        max draft 12, lookup first`` or ``plain decoding``."""
        if self.is_plain:
            return "plain decoding"
        if not self.drafts_with_model:
            return f"n-gram lookup drafts only, max draft {self.max_draft}"
        lookup = ", lookup first" if self.lookup else ""
        return (f"{self.precision} draft, skip attention {sorted(self.skip.attention)} mlp {sorted(self.skip.mlp)}, "
                f"threshold {self.threshold}, max draft {self.max_draft}{lookup}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "speculative": self.speculative,
            "skip": self.skip.to_dict(),
            "precision": self.precision,
            "threshold": self.threshold,
            "max_draft": self.max_draft,
            "lookup": self.lookup,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DraftPolicy":
        return cls(
            skip=SkipSet.from_dict(data.get("skip", {})),
            precision=data.get("precision", "full"),
            threshold=float(data.get("threshold", DEFAULT_THRESHOLD)),
            max_draft=int(data.get("max_draft", DEFAULT_MAX_DRAFT)),
            speculative=bool(data.get("speculative", True)),
            lookup=bool(data.get("lookup", False)),
        )


PLAIN = DraftPolicy(speculative=False)

# Where the runner has no quantised draft copy (the native target), n-gram lookup drafts alone, at most this
# many tokens: verifying more costs more than their acceptance pays there (docs/measurements.md).
LOOKUP_ONLY = DraftPolicy(lookup=True, max_draft=4)
