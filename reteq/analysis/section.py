"""A report section: what every producer (LLM analysis, theory module) hands to the report writer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Section:
    title: str
    paragraphs: list[str] = field(default_factory=list)  # plain text (escaped by the writer)
    tables: dict[str, Any] = field(default_factory=dict)  # name -> polars.DataFrame
    charts: dict[str, Any] = field(default_factory=dict)  # name -> altair.Chart
    links: dict[str, str] = field(default_factory=dict)  # label -> URL: the runs it was drawn from, in the MLflow UI
