"""Analysis: MLflow -> polars -> divergence, recency, Table 1 -> altair charts -> report.html."""
