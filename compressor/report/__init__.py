"""The report: rows, report.json/md/html, the diagnosis, the load tables, and
`compressor bench` (measuring files without a pipeline).

May import: the top-level contracts, `models`, `runtime`.
"""
