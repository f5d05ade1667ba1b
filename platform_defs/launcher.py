"""A run launcher for the daemon and the UI: a run goes to the instance's warm host when one is up (a child
forked with everything imported and the model loaded: a small run takes seconds, not tens of them), else to
Dagster's default launcher (a new process through the code server).

Configured in dagster.yaml:

    run_launcher:
      module: platform_defs.launcher
      class: WarmRunLauncher
"""

import os
import signal

from dagster import DefaultRunLauncher
from dagster._core.launcher import LaunchRunContext

from quiver.warm import NoAnswerError, submit_run

HOST_PID_TAG = "quiver/warm_host_pid"
CHILD_PID_TAG = "quiver/warm_child_pid"


class WarmRunLauncher(DefaultRunLauncher):
    def launch_run(self, context: LaunchRunContext) -> None:
        run = context.dagster_run
        try:
            answer = submit_run(run.run_id)
        except NoAnswerError as exc:  # it may be running there: launching it again could run it twice
            self._instance.report_engine_event(f"{exc}; not launched again", run, cls=self.__class__)
            raise
        if answer and "accepted" in answer:
            self._instance.add_run_tags(run.run_id, {CHILD_PID_TAG: str(answer["accepted"]),
                                                     HOST_PID_TAG: str(answer.get("host", ""))})
            self._instance.report_engine_event(
                f"launched in a child (pid {answer['accepted']}) of the warm host (pid {answer.get('host')})", run,
                cls=self.__class__)
            return
        if answer and "refused" in answer:
            self._instance.report_engine_event(f"warm host not used: {answer['refused']}", run, cls=self.__class__)
        super().launch_run(context)

    def terminate(self, run_id: str) -> bool:
        run = self._instance.get_run_by_id(run_id)
        if run is None or CHILD_PID_TAG not in run.tags:
            return super().terminate(run_id)
        if run.is_finished:
            return False
        self._instance.report_run_canceling(run)
        try:
            os.kill(int(run.tags[CHILD_PID_TAG]), signal.SIGINT)  # a KeyboardInterrupt: the run fails cleanly
        except (ProcessLookupError, ValueError):
            return False
        return True
