"""The run report renders every section, with valid PNG plots, whether the tables are full or empty."""

import pandas as pd
import pytest

from tasks.report import CURVES_PNG, EXACT_MATCH_PNG, MOE_PNG, markdown_table, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SECTIONS = [
    "## What data went in",
    "## What model",
    "## How long it took",
    "## What it scored",
    "## MoE health",
    "## Sample generations",
    "## Next-token view",
    "## Comparison with the champion",
    "## Links",
]
PLOTS = (CURVES_PNG, EXACT_MATCH_PNG, MOE_PNG)


def full_inputs(with_expert_load: bool = True) -> dict:
    curves = pd.DataFrame(
        [(step, stage, metric, 5.0 - step / 10 + (0.2 if metric == "val_loss" else 0))
         for stage in ("finetune", "pretrain") for step in range(1, 11) for metric in ("loss", "val_loss", "lr")],
        columns=["step", "stage", "metric", "value"],
    )
    expert_load = pd.DataFrame(
        [(model, layer, expert, 0.25) for model in ("base", "tuned") for layer in range(2) for expert in range(4)],
        columns=["model", "layer", "expert", "share"],
    )
    return dict(
        title="tinyseek tiny run",
        data_summary={
            "documents in": 120, "documents out": 97,
            "drop_reasons": pd.DataFrame({"reason": ["too_short", "duplicate"], "documents": [15, 8]}),
        },
        model_summary={"params_total": 1_234_567, "params_activated": 456_789, "layers": 2, "routed experts": 4},
        timings={"collect": 1.5, "pretrain": 30.25},
        metrics={"val_loss_base": 2.5, "val_loss_tuned": 2.0, "exact_match_add_base": 0.0,
                 "exact_match_add_tuned": 0.5, "exact_match_mean_tuned": 0.5, "max_vio_final": 0.125},
        exact_match=pd.DataFrame(
            {"family": ["add", "reverse"], "n": [4, 4], "base": [0.0, 0.25], "tuned": [0.5, 0.75]}
        ),
        curves=curves,
        max_vio=pd.DataFrame({"layer": [0, 1], "pretrain": [0.4, 0.2], "finetune": [0.3, 0.1]}),
        generations=pd.DataFrame({"kind": ["chat"], "prompt": ["What is 1 + 1?"], "base": ["a|b"], "tuned": ["2\nok"]}),
        next_token=pd.DataFrame({"prompt": ["def"], "rank": [1], "token_base": [" main"], "probability_base": [0.5],
                                 "token_tuned": ["("], "probability_tuned": [0.25]}),
        comparison=pd.DataFrame({"metric": ["exact_match_mean"], "challenger": [0.5], "champion": [0.4],
                                 "better": ["challenger"]}),
        links={"MLflow run": "http://localhost:5000/#/runs/abc"},
        expert_load=expert_load if with_expert_load else None,
        decision="exact_match_mean 0.5 beats the champion's 0.4",
    )


def empty_inputs() -> dict:
    return dict(
        title="empty run", data_summary={}, model_summary={}, timings={}, metrics={},
        exact_match=pd.DataFrame(), curves=pd.DataFrame(), max_vio=pd.DataFrame(), generations=pd.DataFrame(),
        next_token=pd.DataFrame(), comparison=None, links={},
    )


def assert_rendered(path):
    text = path.read_text()
    positions = [text.index(heading) for heading in SECTIONS]
    assert positions == sorted(positions)
    for plot in PLOTS:
        assert f"]({plot})" in text
        assert (path.parent / plot).read_bytes().startswith(PNG_MAGIC)
    return text


@pytest.mark.parametrize("with_expert_load", [True, False], ids=["heatmap", "max-vio-bars"])
def test_full_report(tmp_path, with_expert_load):
    path = write_report(tmp_path / "report", **full_inputs(with_expert_load))
    assert path == tmp_path / "report" / "report.md"
    text = assert_rendered(path)
    assert text.startswith("# tinyseek tiny run")
    assert "| documents out | 97 |" in text
    assert "| too_short | 15 |" in text
    assert "| params_total | 1,234,567 |" in text
    assert "| pretrain | 30.25 |" in text and "Total: 31.8 s." in text
    assert "| val_loss | 2.5 | 2 |" in text
    assert "| exact_match_mean |  | 0.5 |" in text
    assert "| exact_match_add |" not in text  # per-family scores live in their own table
    assert "| add | 4 | 0 | 0.5 |" in text
    assert "| chat | What is 1 + 1? | a\\|b | 2\\nok |" in text
    assert "Decision: exact_match_mean 0.5 beats" in text
    assert "- MLflow run: http://localhost:5000/#/runs/abc" in text


def test_empty_report_still_has_every_section(tmp_path):
    text = assert_rendered(write_report(tmp_path, **empty_inputs()))
    assert text.count("_none_") >= 9
    assert "there is no champion to compare with" in text
    text = assert_rendered(write_report(tmp_path, **empty_inputs(), champion=3))  # one registered by hand
    assert "the champion (version 3) has no recorded scores to compare with" in text


def test_markdown_table_formats_and_escapes():
    table = pd.DataFrame({"name": ["a|b", "x\ny"], "count": [1234, 5], "score": [0.123456, float("nan")],
                          "ok": [True, False]})
    assert markdown_table(table).splitlines() == [
        "| name | count | score | ok |",
        "|---|---|---|---|",
        "| a\\|b | 1,234 | 0.1235 | yes |",
        "| x\\ny | 5 |  | no |",
    ]
    assert markdown_table(pd.DataFrame()) == "_none_"


def test_code_in_a_table_shows_as_written():
    """Prompts, completions and tokens are Python: Markdown would read `__init__` as bold and
    `<module>` as HTML. A token keeps its quotes, so its spaces show."""
    table = pd.DataFrame({"prompt": ["def __init__(self", "<module> & [x](y) *a* ~b~ `c`"], "token": ["' m'", "'\\n'"]})
    assert markdown_table(table).splitlines()[2:] == [
        "| def \\_\\_init\\_\\_(self | ' m' |",
        "| \\<module\\> \\& \\[x\\](y) \\*a\\* \\~b\\~ \\`c\\` | '\\\\n' |",
    ]
