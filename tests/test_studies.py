"""Studies: every study runs in quick mode, its report's table carries results.json's numbers,
and its verdict follows the stated rule."""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

from jaxclip import studies
from jaxclip.studies import common, report


def load_launcher():
    path = Path(__file__).resolve().parent.parent / "launch" / "study.py"
    spec = importlib.util.spec_from_file_location("study_launcher", path)
    launcher = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launcher)
    return launcher


def test_unknown_study_is_refused_with_the_choices(capsys):
    launcher = load_launcher()
    assert launcher.main(["--study", "lift_vs_clipp"]) == 2
    message = capsys.readouterr().err
    assert "Unknown study 'lift_vs_clipp'" in message
    assert all(name in message for name in studies.STUDIES)


def test_verdict_rule_on_constructed_effects():
    assert common.judge(0.10, 0.02, "x")["label"] == "reproduced"  # 0.10 > 2 x 0.02
    assert common.judge(-0.10, 0.02, "x")["label"] == "not reproduced"
    assert common.judge(0.03, 0.02, "x")["label"] == "inconclusive"  # 0.03 < 0.04
    assert common.judge(0.015, 0.0, "x")["label"] == "inconclusive"  # below the 0.01 floor x 2
    assert common.judge(0.5, math.nan, "x")["label"] == "inconclusive"  # no seed estimate
    both = {"a": common.judge(0.1, 0.0, "a"), "b": common.judge(-0.1, 0.0, "b")}
    assert common.combine_verdicts(both)["label"] == "not reproduced"


def test_similarity_margin_against_a_float64_loop():
    rng = np.random.default_rng(0)
    img, txt = rng.normal(size=(6, 4)), rng.normal(size=(6, 4))
    captions = ["a", "b", "a", "c", "d", "e"]  # 0 and 2 share a caption: not negatives
    pos = np.mean([img[i] @ txt[i] for i in range(6)])
    neg = [img[i] @ txt[j] for i in range(6) for j in range(6) if captions[i] != captions[j]]
    got = common.similarity_margin(img, txt, captions)
    assert got["margin/positive"] == pytest.approx(pos, abs=1e-12)
    assert got["margin/negative"] == pytest.approx(np.mean(neg), abs=1e-12)
    assert got["margin/gap"] == pytest.approx(pos - np.mean(neg), abs=1e-12)


def parse_table(table: str) -> dict[str, dict[str, str]]:
    header, _, *body = [line.strip("|").split("|") for line in table.splitlines()]
    columns = [c.strip() for c in header[1:]]
    return {
        cells[0].strip(): dict(zip(columns, (c.strip() for c in cells[1:]), strict=True))
        for cells in body
    }


@pytest.mark.parametrize("name", studies.STUDIES)
def test_quick_study_reports_the_numbers_of_its_results(name, tmp_path):
    data = studies.run_study(name, tmp_path, quick=True, seed=0)
    out = tmp_path / name
    assert json.loads((out / "results.json").read_text()) == data
    assert data["verdict"]["label"] in common.VERDICTS
    assert data["rows"] and set(data["runs"]) <= set(data["rows"]) | {
        n.replace("minilm", "clip") for n in data["rows"]
    }
    text = (out / "report.md").read_text()
    assert f"**{data['verdict']['label']}**" in text.split("## Verdict", 1)[1]
    shown = parse_table(report.table_from_report(text))
    assert list(shown) == list(data["rows"])
    for variant, row in data["rows"].items():
        for column in data["columns"]:
            cell, value = shown[variant][column], row.get(column)
            if value is None:
                assert cell == "—", (variant, column)
            else:
                assert float(cell) == pytest.approx(value, rel=1e-3, abs=1e-4), (variant, column)
    for plot in data.get("plots", []) or []:
        assert (out / plot).is_file()
    assert all((out / p).stat().st_size > 0 for p in out.glob("*.png"))
    assert name in (out / "report.md").read_text()


def test_readme_table_reads_verdict_and_wall_time_from_results_json(tmp_path):
    readme_table = load_launcher().readme_table
    (tmp_path / "positive_pair").mkdir()
    data = {"quick": False, "wall_s": 312.4, "verdict": {"label": "inconclusive"}}
    data["machine"] = {"nproc": 2}
    (tmp_path / "positive_pair" / "results.json").write_text(json.dumps(data))
    rows = {line.split("|")[1].strip(): line for line in readme_table(tmp_path).splitlines()}
    assert "inconclusive" in rows["[positive_pair](" + str(tmp_path) + "/positive_pair/report.md)"]
    assert "312 s" in rows["[positive_pair](" + str(tmp_path) + "/positive_pair/report.md)"]
    assert "not run" in rows["lift_vs_clip"]
