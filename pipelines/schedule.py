"""`make schedule`: create or update the recurring `irpo-epoch` run through `kfp.Client`.

KFP has no update for a recurring run, so an existing one of the same name is deleted and
created again from the compiled pipeline. One run at a time (`max_concurrency=1`): an epoch
needs the previous one's champion; no catch-up: missed epochs are not replayed in a burst.
Each run ingests the window that ends at its scheduled time (`[[ScheduledTime]]`).
"""

import argparse
from collections.abc import Mapping
from typing import Any

from pipelines.irpo_epoch import COMPILED

JOB_NAME = "irpo-epoch"
EXPERIMENT = "llm-auction"
DEFAULT_CRON = "0 0 */6 * * *"  # KFP's six-field cron: every 6 hours, as deploy/base/recurring-run.yaml says
SCHEDULED_PARAMS = {"window_start": "", "window_end": "[[ScheduledTime]]"}


def create_or_update(
    client: Any,
    cron: str = DEFAULT_CRON,
    params: Mapping[str, Any] | None = None,
    job_name: str = JOB_NAME,
    experiment: str = EXPERIMENT,
    package: str = str(COMPILED),
) -> str:
    """The recurring run's id after (re)creating it with `cron`; any earlier one of that name is removed."""
    experiment_id = client.create_experiment(name=experiment).experiment_id
    existing = client.list_recurring_runs(experiment_id=experiment_id, page_size=100).recurring_runs or []
    for job in existing:
        if job.display_name == job_name:
            client.delete_recurring_run(job.recurring_run_id)
    job = client.create_recurring_run(
        experiment_id=experiment_id,
        job_name=job_name,
        cron_expression=cron,
        max_concurrency=1,
        no_catchup=True,
        params={**SCHEDULED_PARAMS, **(params or {})},
        pipeline_package_path=package,
        enable_caching=False,
    )
    return job.recurring_run_id


def main() -> None:
    import kfp

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", required=True, help="KFP API, e.g. http://ml-pipeline.kubeflow:8888")
    parser.add_argument("--cron", default=DEFAULT_CRON, help="Six-field cron (seconds first).")
    args = parser.parse_args()
    print(create_or_update(kfp.Client(host=args.host), args.cron))


if __name__ == "__main__":
    main()
