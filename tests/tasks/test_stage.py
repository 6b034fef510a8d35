"""The stage contract: an output is built once, reused while it is whole, built again when damaged."""

import json

from tasks.stage import MANIFEST, run_stage


def build_counting(builds):
    def build(out):
        builds.append(out)
        (out / "data.bin").write_bytes(b"x" * 100)
        (out / "part").mkdir()
        (out / "part" / "table.parquet").write_bytes(b"y" * 10)
        return {"counts": {"rows": 3}}

    return build


def test_a_whole_output_is_reused_and_its_files_recorded(tmp_path):
    builds = []
    first = run_stage("demo", "fp1", build_counting(builds), root=tmp_path)
    again = run_stage("demo", "fp1", build_counting(builds), root=tmp_path)
    assert len(builds) == 1 and not first.cached and again.cached and again.counts == {"rows": 3}
    assert first.manifest()["file_sizes"] == {"data.bin": 100, "part/table.parquet": 10}


def test_a_damaged_output_is_built_again_and_says_why(tmp_path):
    builds = []
    ref = run_stage("demo", "fp1", build_counting(builds), root=tmp_path)
    for damage, says in [
        (lambda: (ref.dir / "data.bin").write_bytes(b"x" * 40), "data.bin has 40 bytes, not the 100"),
        (lambda: (ref.dir / "part" / "table.parquet").unlink(), "part/table.parquet is missing"),
        (lambda: (ref.dir / MANIFEST).write_text('{"stage": "de'), f"its {MANIFEST} cannot be read"),
        (lambda: (ref.dir / MANIFEST).write_text("[]"), f"its {MANIFEST} is not the manifest of this output"),
        (lambda: (ref.dir / MANIFEST).write_text("{}"), f"its {MANIFEST} is not the manifest of this output"),
    ]:
        damage()
        rebuilt = run_stage("demo", "fp1", build_counting(builds), root=tmp_path)
        assert not rebuilt.cached and rebuilt.path == ref.path
        assert says in json.loads((rebuilt.dir / MANIFEST).read_text())["rebuilt_because"]
        assert (rebuilt.dir / "data.bin").stat().st_size == 100
    assert len(builds) == 6
    assert run_stage("demo", "fp1", build_counting(builds), root=tmp_path).cached


def test_an_output_from_before_file_sizes_were_recorded_is_trusted(tmp_path):
    ref = run_stage("demo", "fp1", build_counting([]), root=tmp_path)
    manifest = json.loads((ref.dir / MANIFEST).read_text())
    del manifest["file_sizes"]
    (ref.dir / MANIFEST).write_text(json.dumps(manifest))
    assert run_stage("demo", "fp1", build_counting([]), root=tmp_path).cached
