"""Two pipeline runs started at the same time on one workspace both finish correctly."""

import subprocess

from safetensors.torch import load_file

from tests.flows.helpers import TINYSEEK, cli_env, last_json

QUICK = ["--set", "pretrain.steps=6", "--set", "finetune.steps=4", "--set", "evaluate.max_examples_per_family=2"]


def test_two_concurrent_runs_share_a_workspace(tmp_path):
    command = [TINYSEEK, "run", "--preset", "tiny", "--workspace", str(tmp_path), "--json", *QUICK]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env())
             for _ in range(2)]
    outputs = [proc.communicate(timeout=600) for proc in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, out[-2000:] + err[-3000:]
    first, second = (last_json(out) for out, _ in outputs)
    for stage in ("collect", "clean", "tokenize", "pretrain", "finetune", "evaluate"):
        assert first["stages"][stage]["path"] == second["stages"][stage]["path"]
        # exactly one of the two built each stage; the other waited for it and reused it
        assert sorted([first["stages"][stage]["cached"], second["stages"][stage]["cached"]]) == [False, True]
    leftovers = [p.name for p in tmp_path.glob("*/.*tmp-*")]
    assert not leftovers
    weights = load_file(f"{first['stages']['finetune']['path']}/model.safetensors")
    assert weights and all(t.isfinite().all() for t in weights.values())
