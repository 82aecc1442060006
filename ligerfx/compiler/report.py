"""What the passes did to a model: rewrites, near misses and counts, readable and as JSON."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field


from ligerfx.graph.source import Location


@dataclass
class MatchRecord:
    pattern: str
    location: Location
    nodes: list  # names of the graph nodes replaced
    graph: int = 0  # which captured graph (a model with graph breaks has several)
    detail: str = ""  # e.g. the casting mode the rewrite chose
    position: int = field(default=-1, repr=False)  # node index in its graph, for ordering
    path: str = ""  # what runs, when the backend decided it (e.g. "CPU: decomposed for inductor")
    # What the rewrite replaced, by node name, for translation validation (compiler/validate.py):
    # {"anchor", "covered", "outputs", "replacements", "new", "dropped"}; None for rewrites not
    # made by the pattern pass (the quantization pass, which is lossy by design)
    region: dict | None = field(default=None, repr=False, compare=False)

    def __str__(self) -> str:
        d = f" ({self.detail})" if self.detail else ""
        p = f" [{self.path}]" if self.path else ""
        return f"{self.pattern}{d} at {self.location}: replaced {len(self.nodes)} nodes{p}"


@dataclass
class NearMiss:
    pattern: str
    location: Location
    reason: str
    graph: int = 0
    position: int = field(default=-1, repr=False)
    size: int = field(default=0, repr=False)  # nodes the refused match covered

    def __str__(self) -> str:
        return f"{self.pattern} at {self.location}: not rewritten: {self.reason}"


@dataclass
class ValidationRecord:
    """Translation validation of one rewrite (compiler/validate.py): `status` is "equal" (the
    rewritten region gave the original's result within eager's rounding), "dropped" (it did not:
    the graph was compiled without it) or "not validated" (the validator could not run it)."""

    pattern: str
    location: Location
    status: str
    detail: str = ""
    graph: int = 0
    position: int = field(default=-1, repr=False)
    # outputs the rewrite deliberately does not compute (an option's contract, e.g. skip_logits),
    # which were therefore not compared: "output 1 (`logits`): why"
    not_compared: list = field(default_factory=list)

    def __str__(self) -> str:
        d = f": {self.detail}" if self.detail else ""
        n = f" (not compared: {'; '.join(self.not_compared)})" if self.not_compared else ""
        return f"{self.pattern} at {self.location}: {self.status}{d}{n}"


@dataclass
class Report:
    """The result of `ligerfx.explain` (and what the backend logs)."""

    matches: list = field(default_factory=list)
    near_misses: list = field(default_factory=list)
    graphs: int = 0
    notes: list = field(default_factory=list)  # statements the user must see (e.g. dropped outputs)
    graphs_before: list = field(default_factory=list)  # readable code of each graph, if recorded
    graphs_after: list = field(default_factory=list)
    validation: list = field(default_factory=list)  # ValidationRecord per checked rewrite

    @property
    def counts(self) -> dict:
        return dict(Counter(m.pattern for m in self.matches))

    def extend(self, other: "Report") -> None:
        base = self.graphs
        for m in other.matches:
            m.graph += base
            self.matches.append(m)
        for n in other.near_misses:
            n.graph += base
            self.near_misses.append(n)
        for v in other.validation:
            v.graph += base
            self.validation.append(v)
        self.graphs += max(other.graphs, 1)
        self.notes.extend(x for x in other.notes if x not in self.notes)
        self.graphs_before.extend(other.graphs_before)
        self.graphs_after.extend(other.graphs_after)

    def to_dict(self) -> dict:
        return {
            "counts": self.counts,
            "graphs": self.graphs,
            "matches": [{k: v for k, v in asdict(m).items() if k != "region"}
                        for m in self.matches],
            "near_misses": [asdict(n) for n in self.near_misses],
            "notes": list(self.notes),
            "graphs_before": list(self.graphs_before),
            "graphs_after": list(self.graphs_after),
            "validation": [asdict(v) for v in self.validation],
        }

    def __str__(self) -> str:
        lines = [f"ligerfx: {len(self.matches)} rewrite(s) in {self.graphs} graph(s)"]
        if self.counts:
            lines.append("  counts: " + ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items())))
        for m in self.matches:
            lines.append(f"  rewrote {m}")
        for n in self.near_misses:
            lines.append(f"  near miss: {n}")
        for note in self.notes:
            lines.append(f"  note: {note}")
        if self.validation:
            equal = sum(v.status == "equal" for v in self.validation)
            lines.append(f"  translation validation: {equal} of {len(self.validation)} checked "
                         "rewrite(s) equal to the original code")
            for v in self.validation:
                if v.status == "dropped":
                    lines.append(f"  DROPPED by translation validation: {v.pattern} at "
                                 f"{v.location}: {v.detail}")
                elif v.status != "equal":
                    lines.append(f"  not validated: {v.pattern} at {v.location}: {v.detail}")
                for what in v.not_compared:
                    lines.append(f"  not compared by translation validation (dropped on purpose):"
                                 f" {v.pattern} at {v.location}: {what}")
        return "\n".join(lines)
