"""New Prefect databases are copies of a migrated template (the CLI tests run on them)."""

import sqlite3

from flows import prefect_database


def test_a_new_database_is_a_copy_of_the_template_and_an_existing_one_is_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    template = prefect_database.template_path()
    assert template.parent == tmp_path / "cache" / "tinyseek"
    template.parent.mkdir(parents=True)
    sqlite3.connect(template).execute("create table alembic_version (version_num text)").connection.commit()

    new = tmp_path / "home" / "prefect.db"
    new.parent.mkdir()
    prefect_database.seed(new)
    assert new.read_bytes() == template.read_bytes()

    existing = tmp_path / "home" / "prefect-1.db"
    existing.write_bytes(b"runs of this workspace")
    prefect_database.seed(existing)
    assert existing.read_bytes() == b"runs of this workspace"
    assert sorted(p.name for p in new.parent.iterdir()) == ["prefect-1.db", "prefect.db"]


def test_without_a_template_the_database_is_left_to_the_server(tmp_path, monkeypatch):
    """A template that cannot be made (here: migrations that fail) creates nothing, leaves no
    partial file and raises nothing: the server then migrates the database itself."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(prefect_database.sys, "executable", "false")
    database = tmp_path / "prefect.db"
    prefect_database.seed(database)
    assert not database.exists() and not prefect_database.template_path().exists()
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]
    assert list((tmp_path / "cache" / "tinyseek").iterdir()) == []


def test_a_database_created_meanwhile_by_another_process_is_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    template = prefect_database.template_path()
    template.parent.mkdir(parents=True)
    template.write_bytes(b"migrated")
    database = tmp_path / "home" / "prefect.db"
    database.parent.mkdir()
    copy = prefect_database.shutil.copyfile

    def another_process_first(source, target):
        database.write_bytes(b"the other server's runs")
        return copy(source, target)

    monkeypatch.setattr(prefect_database.shutil, "copyfile", another_process_first)
    prefect_database.seed(database)
    assert database.read_bytes() == b"the other server's runs"
    assert [p.name for p in database.parent.iterdir()] == ["prefect.db"]
