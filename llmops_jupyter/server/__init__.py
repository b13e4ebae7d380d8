"""jupyter-server extension: the REST routes behind the Lab sidebar (runs, lineage, resources, run-as-pipeline).

Enabled by ``jupyter-config/server-config/llmops_jupyter.json`` (installed into ``etc/jupyter``). The registry is
``$LLMOPS_HOME`` when set (relative values are taken from the server root), else ``<server root>/.llmops``.

Every route is authenticated *and* authorized by the server's ``Authorizer`` on the resource ``"llmops"``: ``read``
for the GET routes, ``execute`` to start a pipeline (it runs a notebook), ``write`` to cancel one (see
:mod:`llmops_jupyter.server.handlers`). A deployment restricting users with a custom ``Authorizer`` (JupyterHub RBAC,
``--ServerApp.authorizer_class``) therefore controls who may run notebooks from the sidebar.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def registry_home(root_dir: str | os.PathLike) -> Path:
    """The registry the server shows: ``$LLMOPS_HOME`` (relative to the root) or ``<root>/.llmops``."""
    root = Path(root_dir).expanduser()
    env = os.environ.get("LLMOPS_HOME")
    home = Path(env).expanduser() if env else Path(".llmops")
    return (home if home.is_absolute() else root / home).resolve()


def setup_handlers(web_app: Any, root_dir: str | os.PathLike) -> None:
    from jupyter_server.utils import url_path_join

    from llmops_jupyter.server.handlers import (
        LineageHandler,
        ParametersHandler,
        PipelineHandler,
        PipelineJobHandler,
        ResourcesHandler,
        RunHandler,
        RunsHandler,
        SelectionHandler,
    )
    from llmops_jupyter.server.pipeline import PipelineJobs

    root = Path(root_dir).expanduser().resolve()
    home = registry_home(root)
    web_app.settings.update(llmops_root=str(root), llmops_home=str(home), llmops_jobs=PipelineJobs(root, home))
    base = url_path_join(web_app.settings.get("base_url", "/"), "llmops")
    web_app.add_handlers(".*$", [
        (url_path_join(base, "runs"), RunsHandler),
        (url_path_join(base, "runs", r"(?P<ref>[^/]+)"), RunHandler),
        (url_path_join(base, "lineage", r"(?P<ref>[^/]+)"), LineageHandler),
        (url_path_join(base, "resources"), ResourcesHandler),
        (url_path_join(base, "parameters"), ParametersHandler),
        (url_path_join(base, "selection"), SelectionHandler),
        (url_path_join(base, "pipeline"), PipelineHandler),
        (url_path_join(base, "pipeline", r"(?P<job_id>[0-9a-f]+)"), PipelineJobHandler),
    ])


def _load_jupyter_server_extension(server_app: Any) -> None:
    setup_handlers(server_app.web_app, server_app.root_dir)
    server_app.log.info("llmops_jupyter: /llmops routes enabled (registry %s)",
                        server_app.web_app.settings["llmops_home"])


load_jupyter_server_extension = _load_jupyter_server_extension  # older jupyter-server name
