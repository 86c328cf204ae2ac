"""How a study declares where its outputs go on the report page (``dpn-lens report``).

Each study module names its ``REPORT_SECTION``: the file-name prefix every output of the study starts
with, and the section title. ``dpn_lens.studies.STUDY_SECTIONS`` lists them in page order; the HTML
report builds its sections from that list, so a new study is its module plus one line there.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ReportSection"]


@dataclass(frozen=True)
class ReportSection:
    """One section of the report page and the files it gathers.

    Attributes:
        key: the file-name prefix (``layers`` gathers ``layers.*`` and ``layers_*``) and HTML anchor.
        title: the section heading.
        names: further exact file stems that belong here (e.g. ``rows`` of ``dpn-lens compare``).
        prefixes: further stem prefixes, matched as they are (no ``_`` added).

    Example:
        >>> section = ReportSection("layers", "Layer-wise study")
        >>> section.matches("layers_counts"), section.matches("layersx")
        (True, False)
    """

    key: str
    title: str
    names: frozenset[str] = frozenset()
    prefixes: tuple[str, ...] = ()

    def matches(self, stem: str) -> bool:
        """Whether a file of this stem (name without its suffix) belongs to the section."""
        return (stem == self.key or stem.startswith(self.key + "_") or stem in self.names
                or any(stem.startswith(prefix) for prefix in self.prefixes))
