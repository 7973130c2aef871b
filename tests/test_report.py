"""The side-by-side table: every scored side, the views' gain, the KD margin and its warning."""

from distill.report import format_table, kd_margin


def report(split="val", teacher=0.80, student=0.795, views=0.80):
    at = {
        who: {"dice": d, "recall": 0.8, "precision": 0.8}
        for who, d in (("teacher", teacher), ("student", student), ("student_views", views))
    }
    curves = {who: {"dice": [at[who]["dice"]] * 2, "recall": [0.8, 0.7]} for who in at}
    return {
        "split": split,
        "n_images": 3,
        "thresholds": [0.4, 0.5],
        "chosen_threshold": {"rule": "max_dice", "teacher": 0.4, "student": 0.5, "student_views": 0.5},
        "at_chosen": at,
        "test_views": ["identity", "hflip"],
        **curves,
    }


def test_table_shows_student_with_and_without_views_and_the_kd_margin():
    table = format_table(report())
    assert "teacher dice" in table and "student dice" in table and "student+views dice" in table
    assert "views (identity,hflip) add +0.0050 Dice to the student" in table
    assert "KD margin (teacher - student Dice at their own chosen thresholds): +0.0050" in table
    assert kd_margin(report()) == 0.005


def test_a_margin_under_one_point_warns_on_validation_only():
    assert "KD is unlikely to help" in format_table(report(teacher=0.80, student=0.795))
    assert "KD is unlikely to help" not in format_table(report(teacher=0.82, student=0.795))
    assert "KD is unlikely to help" not in format_table(report("test", teacher=0.80, student=0.795))
    assert "the teacher is worse than the student" in format_table(report(teacher=0.59, student=0.74))
