"""`python -m lanskap.sweep`: experiments read from `dvc exp show --json`, grouped by the params that differ
(the seed aside), summarised and compared. The real 2-seed queued sweep, end to end, is in test_pipeline (on its
committed run)."""

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from lanskap.core.errors import UserError
from lanskap.sweep import seed_stats
from lanskap.sweep.aggregate import finished_experiments, group_by_setting, main
from tests.conftest import ROOT

FID = {0: 160.0, 1: 230.0, 2: 120.0, 3: 150.0, 4: 200.0, 5: 170.0}  # by seed


def experiment(name: str, seed: int, rank: int = 4, state: str | None = "success", fid: float | None = None) -> dict:
    """One experiment as `dvc exp show --json` lists it (the fields the sweep reads)."""
    fid = FID[seed] + rank if fid is None else fid
    data = {
        "rev": f"{name:0<40}"[:40],
        "params": {
            "params.yaml": {
                "data": {
                    "lora": {"rank": rank, "alpha": 4.0},
                    "train": {"seed": seed, "steps": 150},
                    "augment": {"crop_scale": [0.8, 1.0]},
                }
            }
        },
        "metrics": {
            "metrics/eval.json": {"data": {"fid_test_vs_lora": fid, "cmmd_vs_test_lora_minus_base": -5.0 - seed}},
            "dvclive/train/metrics.json": {
                "data": {"validation": {"loss": 0.2}, "validation_loss_final": 0.2 + seed / 100}
            },
        },
    }
    return {
        "name": name,
        "executor": state and {"state": state},
        "revs": [{"rev": data["rev"], "name": name, "error": None, "data": data}],
    }


def exp_show(*experiments: dict) -> list:
    workspace = experiment("workspace", 0)["revs"][0]
    return [
        {**workspace, "experiments": None},
        {**workspace, "rev": "a" * 40, "name": "main", "experiments": list(experiments)},
    ]


SWEEP = [experiment(f"r{rank}-s{seed}", seed, rank) for rank in (16, 4) for seed in (0, 1, 2)]


def test_groups_by_the_params_that_differ_and_skips_unfinished_experiments():
    shown = exp_show(
        *SWEEP,
        experiment("queued-one", 3, 8, state="queued"),
        experiment("running-one", 4, 8, state="running"),
        experiment("broken", 5, 8, state="failed"),
    )
    finished, skipped = finished_experiments(shown, ["metrics/eval.json"])
    assert skipped == ["queued-one (queued)", "running-one (running)", "broken (failed)"]
    groups = group_by_setting(finished, "train.seed")
    assert list(groups) == ["lora.rank=4", "lora.rank=16"]  # by value, not as text
    assert [member.name for member in groups["lora.rank=16"]] == ["r16-s0", "r16-s1", "r16-s2"]
    assert "validation_loss_final" not in finished[0].metrics  # only the --metrics files are read


def test_one_setting_when_only_the_seed_differs():
    finished, _ = finished_experiments(exp_show(*SWEEP[:3]), ["metrics/eval.json"])
    assert list(group_by_setting(finished, "train.seed")) == ["all"]


def test_a_one_off_experiment_is_skipped_and_named_a_lone_one_or_a_repeated_seed_refused(capsys):
    finished, _ = finished_experiments(exp_show(*SWEEP[:3], experiment("stray", 0, rank=8)), ["metrics/eval.json"])
    assert list(group_by_setting(finished, "train.seed")) == ["lora.rank=16"]
    assert "skipped setting lora.rank=8: 1 experiment(s) ['stray']" in capsys.readouterr().err
    finished, _ = finished_experiments(exp_show(SWEEP[0], experiment("stray", 0, rank=8)), ["metrics/eval.json"])
    with pytest.raises(UserError, match=r"setting lora.rank=8 has 1 finished experiment\(s\) \(\['stray'\]\).*--exp"):
        group_by_setting(finished, "train.seed")
    finished, _ = finished_experiments(exp_show(*SWEEP[:3], experiment("again", 1, rank=16)), ["metrics/eval.json"])
    with pytest.raises(UserError, match=r"setting all: train.seed \['1'\] ran more than once"):
        group_by_setting(finished, "train.seed")


def run_sweep(tmp_path: Path, experiments: list, *args: str) -> dict:
    saved = tmp_path / "exp-show.json"
    saved.write_text(json.dumps(exp_show(*experiments)))
    main(["--from-json", str(saved), "--out", str(tmp_path / "sweep"), *args])
    return json.loads((tmp_path / "sweep/summary.json").read_text())


def test_summary_and_paired_comparison_when_both_settings_ran_the_same_seeds(tmp_path, capsys):
    summary = run_sweep(tmp_path, SWEEP, "--metric", "fid_test_vs_lora", "--metric", "validation_loss_final")
    rank4 = [FID[seed] + 4 for seed in (0, 1, 2)]
    expected = seed_stats.summarise(rank4)
    row = next(
        row for row in summary["summary"] if row["setting"] == "lora.rank=4" and row["metric"] == "fid_test_vs_lora"
    )
    assert (row["n"], row["mean"], row["ci_low"], row["ci_high"]) == pytest.approx(
        (3, expected.mean, expected.ci_low, expected.ci_high)
    )
    assert row["seeds"] == "0 1 2"
    comparison = next(row for row in summary["comparisons"] if row["metric"] == "fid_test_vs_lora")
    assert comparison["method"] == "paired" and comparison["difference"] == pytest.approx(12.0)
    assert comparison["pvalue"] is None  # the same gap on every seed: no spread, no p-value (not NaN in the JSON)
    table = pd.read_csv(tmp_path / "sweep/summary.csv")
    assert {"setting", "metric", "mean", "ci_low", "ci_high", "n"} <= set(table.columns) and len(table) == 4
    assert "| lora.rank=4 - " not in capsys.readouterr().out  # other - reference, reference first
    assert "lora.rank=16 - lora.rank=4" in (tmp_path / "sweep/summary.md").read_text()


def test_welch_when_the_settings_ran_different_seeds(tmp_path):
    sweep = SWEEP[3:] + [experiment(f"r16-s{seed}", seed, 16, fid=FID[seed] + 40) for seed in (3, 4, 5)]
    summary = run_sweep(tmp_path, sweep, "--metric", "fid_test_vs_lora", "--reference", "lora.rank=16")
    comparison = summary["comparisons"][0]
    expected = seed_stats.welch_difference(
        [FID[seed] + 40 for seed in (3, 4, 5)], [FID[seed] + 4 for seed in (0, 1, 2)]
    )
    assert comparison["setting"] == "lora.rank=4" and comparison["reference"] == "lora.rank=16"
    assert comparison["method"] == "welch"
    assert (comparison["difference"], comparison["pvalue"]) == pytest.approx((expected.difference, expected.pvalue))


def test_input_errors_name_what_to_fix(tmp_path):
    with pytest.raises(UserError, match="no numeric metric fid_test_vs_text"):
        run_sweep(tmp_path, SWEEP, "--metric", "fid_test_vs_text")
    with pytest.raises(UserError, match=r"--exp \['nope'\]"):
        run_sweep(tmp_path, SWEEP, "--exp", "nope")
    with pytest.raises(UserError, match="--reference 'lora.rank=8'"):
        run_sweep(tmp_path, SWEEP, "--reference", "lora.rank=8")
    with pytest.raises(UserError, match="no finished experiment"):
        run_sweep(tmp_path, [experiment("queued-one", 3, state="queued")])
    assert not (tmp_path / "sweep").exists()


def test_outside_a_dvc_project_it_says_where_to_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"`dvc exp show --json` failed \(run this in the project root\)"):
        main([])
    (tmp_path / "saved.json").write_text("not json")
    with pytest.raises(UserError, match="--from-json saved.json: cannot read it"):
        main(["--from-json", "saved.json"])


def test_the_chart_template_draws_from_summary_csv(tmp_path):
    """dvc.yaml's sweep plot: DVC fills .dvc/plots/sweep_bars.json with summary.csv's rows and its fields."""
    from dvc_render import VegaRenderer

    run_sweep(tmp_path, SWEEP, "--metric", "fid_test_vs_lora")
    plots = yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
    definition = next(
        next(iter(plot.values()))
        for plot in plots
        if isinstance(plot, dict) and next(iter(plot.values())).get("template") == "sweep_bars"
    )
    assert list(definition["y"]) == ["${reports}/sweep/summary.csv"]
    rows = [
        {**row, "rev": "workspace"}
        for row in pd.read_csv(tmp_path / "sweep/summary.csv").astype(str).to_dict("records")
    ]
    spec = VegaRenderer(
        rows,
        "sweep",
        template="sweep_bars",
        template_dir=str(ROOT / ".dvc/plots"),
        x=definition["x"],
        y=definition["y"]["${reports}/sweep/summary.csv"],
    ).get_filled_template()
    assert spec["data"]["values"] == rows
    assert spec["spec"]["encoding"]["x"]["field"] == "setting"
    assert "<DVC_METRIC" not in json.dumps(spec)
    used = {
        transform["calculate"][len("toNumber(datum.") : -1]
        for transform in spec["transform"]
        if "calculate" in transform
    }
    assert used == {"mean", "ci_low", "ci_high"}, used  # toNumber(datum.FIELD)
    assert used | {"metric", "n"} <= set(rows[0])  # each field the chart reads is a column of summary.csv


WRONG_SHAPES = {  # saved file content: what the error must name first
    "null": "the top level is null, expected a list",
    "[1, 2]": r"\[0\] is a number, expected an object",
    '"exp show"': "the top level is a string, expected a list",
    '{"experiments": []}': "the top level is an object, expected a list",
    '[{"experiments": {"a": 1}}]': r"\[0\]\.experiments is an object, expected a list or null",
    '[{"experiments": [{"name": "e1"}]}]': r"\[0\]\.experiments\[0\]\.revs is null, expected a list",
    '[{"experiments": [{"name": "e1", "revs": []}]}]': r"\[0\]\.experiments\[0\]\.revs is empty",
    '[{"experiments": [{"revs": ["abc"]}]}]': r"\[0\]\.experiments\[0\]\.revs\[0\] is a string, expected an object",
    '[{"experiments": [{"revs": [{"rev": 7}]}]}]': (
        r"\[0\]\.experiments\[0\]\.revs\[0\]\.rev is a number, expected a string"
    ),
    '[{"experiments": [{"revs": [{"rev": "a", "data": {"metrics": {"m.json": 3}}}]}]}]': (
        r'\[0\]\.experiments\[0\]\.revs\[0\]\.data\.metrics\["m\.json"\] is a number, expected an object'
    ),
    '[{"experiments": [{"executor": "done", "revs": [{"rev": "a"}]}]}]': (
        r"\[0\]\.experiments\[0\]\.executor is a string, expected an object or null"
    ),
}


@pytest.mark.parametrize(("content", "message"), list(WRONG_SHAPES.items()))
def test_a_saved_exp_show_of_the_wrong_shape_names_the_first_thing_wrong(tmp_path, content, message):
    (tmp_path / "saved.json").write_text(content)
    with pytest.raises(UserError, match=f"--from-json {tmp_path / 'saved.json'}: {message}"):
        main(["--from-json", str(tmp_path / "saved.json"), "--out", str(tmp_path / "sweep")])
    assert not (tmp_path / "sweep").exists()


METRIC = ["--metric", "fid_test_vs_lora"]


def test_a_saved_exp_show_that_is_not_utf8_is_a_clear_error(tmp_path):
    (tmp_path / "saved.json").write_bytes(b'[{"experiments": null, "name": "caf\xe9"}]')
    with pytest.raises(UserError, match=r"saved\.json: cannot read it as `dvc exp show --json` output \('utf-8'"):
        main(["--from-json", str(tmp_path / "saved.json")])


def test_the_shape_check_passes_what_dvc_writes(tmp_path, capsys):
    """The negative control: a real-shaped file with nulls where DVC writes them is aggregated."""
    shown = exp_show(*SWEEP)
    shown[1]["experiments"][0]["revs"][0]["data"]["metrics"]["absent.json"] = {"data": None}
    (tmp_path / "saved.json").write_text(json.dumps(shown))
    main(
        ["--from-json", str(tmp_path / "saved.json"), "--out", str(tmp_path / "sweep"), "--metric", "fid_test_vs_lora"]
    )
    assert (tmp_path / "sweep/summary.csv").is_file()
