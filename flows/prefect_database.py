"""New Prefect SQLite databases start as a copy of an empty, migrated one.

A Prefect server migrates a new SQLite database before it answers: about 6 s on a laptop
CPU, paid before the first flow run in every workspace (and in every extra database that
concurrent runs take, `flows.cli.ephemeral_database`). The migrations depend on Prefect's
version alone, so they run once per version into a template in the user's cache directory
(`tasks.stage.user_cache`: `~/.cache/tinyseek` by default), and a new database is a copy of
it. Where the template cannot be made or copied, the server migrates the database itself,
as without it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

from tasks.stage import user_cache


def seed(database: Path) -> None:
    """Create `database` as a copy of the migrated template, unless it exists already (also
    when another process creates it meanwhile: the copy is linked in only where no file is)."""
    if database.exists():
        return
    try:
        template = _template()
    except (OSError, subprocess.SubprocessError):
        return
    partial = database.with_name(f".{database.name}.{os.getpid()}.partial")
    try:
        shutil.copyfile(template, partial)
        os.link(partial, database)
    except OSError:
        pass
    finally:
        partial.unlink(missing_ok=True)


def template_path() -> Path:
    return user_cache() / f"prefect-{version('prefect')}.db"


def _template() -> Path:
    """The template for the installed Prefect, migrated by `prefect server database upgrade`
    the first time (into a private file, then renamed: concurrent first runs each make a
    whole one and the last rename wins)."""
    template = template_path()
    if template.exists():
        return template
    template.parent.mkdir(parents=True, exist_ok=True)
    print(f"Migrating an empty Prefect database once for Prefect {version('prefect')} into {template} "
          "(new workspaces start from a copy)", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=template.parent) as scratch:
        migrated = Path(scratch) / template.name
        env = {**os.environ, "PREFECT_HOME": scratch,
               "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{migrated}"}
        subprocess.run([sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"],
                       env=env, check=True, capture_output=True, timeout=300)
        os.replace(migrated, template)
    return template
