"""Resource errors as one line (reteq.resources): the cause, never a wrapper's footer."""

from __future__ import annotations

from reteq.resources import one_line


def test_a_database_error_is_one_line_naming_its_cause_not_sqlalchemys_footer():
    text = ("(sqlite3.OperationalError) database or disk is full\n[SQL: INSERT INTO metrics VALUES (?)]\n"
            "[parameters: (1,)]\n(Background on this error at: https://sqlalche.me/e/21/e3q8)")
    assert one_line(RuntimeError(text)) == "RuntimeError: (sqlite3.OperationalError) database or disk is full"
    full = OSError(28, "No space left on device")
    full.filename = "/w/checkpoints/abc/model.safetensors"
    assert one_line(full) == "/w/checkpoints/abc/model.safetensors: disk full while writing a stage checkpoint"
