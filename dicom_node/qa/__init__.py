"""For QA staff: per-image QC flags, phantom QA sessions, the web dashboard, metrics and reports.

Everything here reads the job log; it changes job state only through `JobLog`'s methods, the same
ones the CLI calls.
"""
