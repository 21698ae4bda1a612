"""Every `dicom-node` command, grouped by audience; each one parses, calls and prints.

- `node`: running the node (serve, worker, check-config, echo, selftest), for radiology IT;
- `jobs`: the job log (jobs, show, retry, cancel, resend, release, reprocess), for radiology IT;
- `tools`: offline tools (process, phantom, calibrate, demo);
- `report`, `phantom_qa` (qa-phantom, qa-sessions), `dashboard` (hash-password): for QA staff.

A user error (bad file, bad config, bad flag) ends as one line on stderr and a non-zero exit;
set DICOM_NODE_DEBUG=1 to see the traceback of an unexpected failure.
"""

from __future__ import annotations

import typer

from dicom_node import __version__
from dicom_node.cli import audit, dashboard, jobs, node, phantom_qa, report, tools
from dicom_node.console import make_app, run_app

app = make_app("dicom-node", "Restores low-dose raw mammograms between the modality and PACS.")

for command in (
    node.serve,
    node.worker,
    node.echo,
    node.selftest,
    jobs.retry,
    jobs.cancel,
    jobs.resend,
    jobs.release,
    jobs.reprocess,
    tools.process,
    tools.phantom,
    tools.calibrate,
    tools.demo,
):
    app.command()(command)
app.command("check-config")(node.check_config)
app.command("qa-phantom")(phantom_qa.qa_phantom)
app.command("qa-sessions")(phantom_qa.qa_sessions)
app.command("hash-password")(dashboard.hash_password)
app.command()(report.report)
app.command()(audit.audit)
jobs_app = typer.Typer(
    name="jobs", add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None, no_args_is_help=False
)
jobs_app.callback(invoke_without_command=True)(jobs.jobs)
jobs_app.command()(jobs.show)
app.add_typer(jobs_app)


@app.command()
def version() -> None:
    """Print the node's version."""
    typer.echo(__version__)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run a command, turning user errors into one line and an exit code."""
    run_app(app, argv, prog="dicom-node")
