"""A local stand-in of the CryoSPARC v5 HTTP API, for driving the real cryosparc-tools client.

No CryoSPARC instance exists where the tests run. This package serves the subset of the v5
REST API that the External-job workflow calls (see :mod:`.openapi` for the operations),
keeps users, projects, workspaces, jobs, outputs, datasets, events and assets in memory,
and stores project files under a temporary directory (the simulated project directory).

Usage::

    standin = StandIn(tmp_path)
    standin.state.add_user("ali@example.com", "secret")
    project_dir = standin.state.add_project("P1")
    standin.state.add_workspace("P1", "W1")
    job_uid = standin.state.add_source_job("P1", "W1", Dataset.load(project_dir / "p.cs"))
    url = standin.start()
    ...
    standin.stop()
"""

from .server import StandIn
from .state import SLOT_FIELDS, HTTPError, State

__all__ = ["SLOT_FIELDS", "HTTPError", "StandIn", "State"]
