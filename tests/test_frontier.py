"""dq.report.frontier: cells of the study's runs, interpolation in log-bytes, paired comparisons, the Pareto front,
the summary file, and bench.frontier's grid."""
import json
import math

import pytest
import yaml

from dq.report import frontier
from dq.core.errors import DQError


def record(family, ratio, seed, nbytes, top1, quality=90):
    return {"family": family, "ratio": ratio, "seed": seed, "bytes": nbytes, "top1": top1, "quality": quality,
            "train_images": int(6000 * ratio), "minutes": 2.0}


def study():
    """Two seeds; dq sits 2 points above random-webp-lossless at equal bytes (seed 0) and 1 point (seed 1)."""
    out = []
    for seed, lead in ((0, 0.02), (1, 0.01)):
        for ratio, nbytes, top1 in ((0.05, 1000, 0.60), (0.1, 2000, 0.70), (1.0, 20000, 0.90)):
            out.append(record("random-webp-lossless", ratio, seed, nbytes, top1 + seed * 0.001))
        for ratio, nbytes, top1 in ((0.05, 1000, 0.55), (0.1, 2000, 0.65)):
            out.append(record("random-jpeg90", ratio, seed, nbytes, top1))
        for ratio, nbytes in ((0.05, 1000), (0.1, 2000)):
            # at the same bytes as random's points: random's value plus the lead
            out.append(record("dq-drop25", ratio, seed, nbytes, 0.60 + seed * 0.001 + lead if ratio == 0.05
                              else 0.70 + seed * 0.001 + lead))
        out.append(record("random-jpeg90", 1.0, seed, 8000, 0.85, quality=90))
        out.append(record("whole-jpeg25", 1.0, seed, 3000, 0.80, quality=25))
    return out


def test_interpolation_is_linear_in_log_bytes_and_never_extrapolates():
    points = [(1000, 0.5), (4000, 0.7)]
    assert frontier.interpolate(points, 2000) == pytest.approx(0.6)  # halfway in log-bytes
    assert frontier.interpolate(points, 1000) == 0.5 and frontier.interpolate(points, 4000) == 0.7
    assert frontier.interpolate(points, 985) is None and frontier.interpolate(points, 4050) is None
    assert frontier.interpolate(points, 995) == 0.5 and frontier.interpolate(points, 4030) == 0.7  # within 1%: equal
    assert frontier.interpolate([(10, 0.3)], 10) == 0.3


def test_cells_group_seeds_and_build_the_whole_set_jpeg_family():
    cells = frontier.cells(study())
    whole_jpeg = [c for c in cells if c.family == frontier.WHOLE_JPEG]
    assert [(c.setting, c.bytes) for c in whole_jpeg] == [("q25", 3000), ("q90", 8000)]
    assert not [c for c in cells if c.family == "whole-jpeg25"]  # one row for the whole set at q25, not two
    dq = [c for c in cells if c.family == "dq-drop25"]
    assert [c.ratio for c in dq] == [0.05, 0.1] and dq[0].top1 == pytest.approx((0.62 + 0.611) / 2)
    assert (dq[0].low, dq[0].high) == pytest.approx((0.611, 0.62))
    assert frontier.whole_set(cells).bytes == 20000


def test_paired_comparison_at_equal_bytes_and_its_interval():
    cells = frontier.cells(study())
    rows = frontier.default_comparisons(cells)
    assert [best for _, best, _ in rows] == ["random-webp-lossless", "random-webp-lossless"]
    comparison = rows[0][2]
    assert comparison.diffs == pytest.approx([0.02, 0.01])
    mean, low, high = comparison.interval()
    half = 12.706 * statistics_stdev([0.02, 0.01]) / math.sqrt(2)  # t(0.975, 1 dof)
    assert mean == pytest.approx(0.015) and (low, high) == pytest.approx((0.015 - half, 0.015 + half), rel=1e-3)


def test_a_study_still_running_compares_only_the_seeds_both_families_have():
    # seed 1 of the dq default has not finished; random has: the comparison is seed 0 alone, not a crash
    records = [r for r in study() if not (r["family"] == "dq-drop25" and r["seed"] == 1)]
    rows = frontier.default_comparisons(frontier.cells(records))
    assert [best for _, best, _ in rows] == ["random-webp-lossless", "random-webp-lossless"]
    assert rows[0][2].diffs == pytest.approx([0.02]) and rows[0][2].interval()[1] is None
    assert "(n=1)" in frontier.markdown(frontier.cells(records), {})


def statistics_stdev(values):
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def test_budgets_compare_the_best_families_inside_their_ranges():
    cells = frontier.cells(study())
    rows = frontier.budget_comparisons(cells)
    assert [share for share, _, _ in rows] == list(frontier.BUDGETS)
    by_share = {share: comparison for share, _, comparison in rows}
    assert by_share[0.02] is None  # 400 bytes: below every family's first point
    assert by_share[0.05].a == "dq-drop25" and by_share[0.05].b == "random-webp-lossless"
    assert by_share[0.05].diffs == pytest.approx([0.02, 0.01])
    assert by_share[0.2] is None  # 4,000 bytes: beyond dq's last point


def test_the_pareto_front_keeps_only_unbeaten_cells():
    cells = frontier.cells(study())
    front = {(c.family, c.setting) for c in frontier.pareto(cells)}
    assert ("dq-drop25", "0.05") in front and ("dq-drop25", "0.1") in front
    assert ("random-jpeg90", "0.05") not in front  # dq has as few bytes and more top-1
    assert ("random-webp-lossless", "1") in front  # the most accurate
    assert (frontier.WHOLE_JPEG, "q25") in front  # 3,000 bytes for 0.80: nothing cheaper does better


def test_the_study_writes_a_summary_the_report_reads_back(tmp_path):
    records = study()
    paths = frontier.write_study(tmp_path, records, {"dq-drop25": "dq default"}, {"model": "m"}, {"steps": 10})
    assert [p.name for p in paths] == ["frontier.png", "frontier.md", "frontier.json"]
    data = frontier.read_summary(tmp_path / "frontier.json")
    assert data["whole_set"] == {"bytes": 20000, "top1": pytest.approx(0.9005)}
    assert data["budget"] == {"steps": 10} and data["families"]["dq-drop25"]["description"] == "dq default"
    cells = frontier.summary_cells(data)
    dq = [c for c in cells if c.family == "dq-drop25"]
    assert [round(c.top1, 4) for c in dq] == [0.6155, 0.7155] and dq[0].low == pytest.approx(0.611)
    assert "| 0.05 | 1,000 | 0.6155 | random-webp-lossless |" in (tmp_path / "frontier.md").read_text()
    assert frontier.read_summary(tmp_path / "none.json") is None
    (tmp_path / "bad.json").write_text(json.dumps({"version": 99}))
    with pytest.raises(DQError, match="bad.json: not a frontier summary of version 1"):
        frontier.read_summary(tmp_path / "bad.json")


def test_the_study_grid_is_every_family_at_its_ratios_with_paired_seeds():
    from bench import frontier as study_grid

    runs = dict(study_grid.runs([0, 1, 2]))
    per_seed = sum(len(ratios) for _, ratios, _ in study_grid.FAMILIES.values())
    assert len(runs) == 3 * per_seed
    assert {study_grid.family_of(name)[:2] for name in runs} == \
        {(f, r) for f, (_, ratios, _) in study_grid.FAMILIES.items() for r in ratios}
    default = runs["dq-drop25-r0.1-s1"]
    assert (default["select"]["method"], default["patches"]["drop"], default["seed"]) == ("dq", 0.25, 1)
    assert "steps" not in default["train"] and default["train"]["resume"]  # params.yaml's own budget
    assert default["train"]["eval_every"] is None  # scored at the final step only
    assert runs["whole-jpeg25-r1-s0"]["patches"] == {"drop": 0.0, "codec": "jpeg", "quality": 25}
    assert study_grid.family_of("random-drop25-r0.05-s2") == ("random-drop25", 0.05, 2)


def test_a_study_cut_short_has_every_seed_of_the_deciding_families_first():
    from bench import frontier as study_grid

    names = [name for name, _ in study_grid.runs([0, 1, 2, 3, 4])]
    deciding = [f"{f}-r{r:g}-s{s}" for f in ("dq-webp-lossless", "random-webp-lossless")
                for r in study_grid.RATIOS for s in range(5)] + [f"random-webp-lossless-r1-s{s}" for s in range(5)]
    assert max(map(names.index, deciding)) == len(deciding) - 1  # every seed of the first tier comes first
    assert names.index("dq-webp-lossless-r0.2-s0") < names.index("dq-webp-lossless-r0.05-s1")  # seed by seed
    assert names.index("random-jpeg50-r0.2-s4") < names.index("whole-jpeg25-r1-s0") < names.index("dq-drop50-r0.05-s0")


def test_a_run_leaves_a_record_that_report_reads_back(tmp_path):
    from bench import frontier as study_grid

    folder = tmp_path / "runs" / "dq-drop25-r0.1-s3"
    (folder / "train").mkdir(parents=True)
    (folder / "train_metrics.json").write_text(json.dumps({
        "compact_bytes": 1234, "top1": 0.8, "steps": 700, "epochs": 149.1, "train_images": 600,
        "full_raw_bytes": 99, "model": "smallnet"}))
    (folder / "params.yaml").write_text(yaml.safe_dump({"patches": {"quality": 90}, "train": {
        "model": "smallnet", "steps": 700, "batch_size": 128, "lr": 0.2, "tta": "flip"}}))
    (folder / "train" / "evaluation.json").write_text(json.dumps({"classes": ["a", "b"], "confusion": [[3, 1], [0, 4]]}))
    (folder / "time.txt").write_text("90.0\n")
    record = study_grid.record_of(folder)
    assert (record["family"], record["ratio"], record["seed"], record["bytes"], record["minutes"]) == \
        ("dq-drop25", 0.1, 3, 1234, 1.5)
    assert record["match"] == {"classes": ["a", "b"], "full_raw_bytes": 99, "test_images": 8, "model": "smallnet"}
    (tmp_path / "records").mkdir()
    (tmp_path / "records" / "dq-drop25-r0.1-s3.json").write_text(json.dumps(record))
    assert study_grid.finished(tmp_path / "records") == [record]


def test_ablations_pair_two_families_seed_by_seed_at_the_same_ratio():
    records = study() + [record("dq-webp-lossless", r, s, b, t) for s in (0, 1)
                         for r, b, t in ((0.05, 1010, 0.64), (0.1, 2020, 0.70))]
    rows = {(c.a, c.b, ratio): (c, byte_ratio) for _, ratio, c, byte_ratio in frontier.ablations(frontier.cells(records))}
    assert set(rows) == {(a, b, r) for a, b in (("dq-drop25", "dq-webp-lossless"), ("dq-webp-lossless", "random-webp-lossless"))
                         for r in (0.05, 0.1)}
    comparison, byte_ratio = rows[("dq-drop25", "dq-webp-lossless", 0.05)]
    assert comparison.diffs == pytest.approx([0.62 - 0.64, 0.611 - 0.64]) and byte_ratio == pytest.approx(1000 / 1010)
    assert "dropping 25% of patches, dq subset" in frontier.markdown(frontier.cells(records), {})


def test_the_selection_pick_is_the_best_method_above_random_else_random():
    """ccs beats random on every seed at 0.1 (+1, +2, +1.5 points: interval above zero), d2 leads on average but
    by noise (+4, -3, +0.5); at 0.2 nothing clears zero, so the pick is random."""
    rows = []
    for seed, (ccs, d2) in enumerate(((0.01, 0.04), (0.02, -0.03), (0.015, 0.005))):
        rows += [record("random-webp-lossless", 0.1, seed, 2000, 0.80), record("ccs-webp-lossless", 0.1, seed, 2000, 0.80 + ccs),
                 record("d2-webp-lossless", 0.1, seed, 2000, 0.80 + d2),
                 record("random-webp-lossless", 0.2, seed, 4000, 0.85), record("ccs-webp-lossless", 0.2, seed, 4000, 0.85 + d2)]
    choices = frontier.selection_choices(frontier.cells(rows))
    assert [(ratio, pick) for ratio, _, pick in choices] == [(0.1, "ccs-webp-lossless"), (0.2, "random-webp-lossless")]
    at_tenth = {c.a: c for c in choices[0][1]}
    assert set(at_tenth) == {"ccs-webp-lossless", "d2-webp-lossless"}
    assert at_tenth["ccs-webp-lossless"].interval()[0] == pytest.approx(0.015)
    text = frontier.markdown(frontier.cells(rows), {})
    assert "| 0.1 | n/a | +1.50 [" in text and "| ccs |" in text and "| random |" in text
