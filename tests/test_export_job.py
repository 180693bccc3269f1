"""Export is a job like the other stages: its CLI flags are generated from the job's keys, which are the keys of a
recipe's export step; bad input is one line, exit 2, before anything loads."""

from __future__ import annotations

import pytest

from recoup.cli import build_parser, main
from recoup.recipe.jobs import JOBS, ExportJob, keys


def _flags(command: str) -> set[str]:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return {a.dest for a in sub.choices[command]._actions if a.dest not in ("help", "func")}


def test_export_flags_are_the_export_job_keys():
    assert JOBS["export"] is ExportJob
    assert _flags("export") == {k.name for k in keys("export")} == set(ExportJob.field_names())


def test_the_cli_builds_the_job_a_recipe_step_builds(tmp_path, monkeypatch):
    from recoup.runs import stages

    seen = []
    monkeypatch.setattr(
        stages,
        "export",
        lambda job: (
            seen.append(job)
            or {"out": job.out, "format": job.format, "bytes": 0, "seconds": 0.0, "plan": {}, "loader": "-"}
        ),
    )
    argv = [
        "export",
        str(tmp_path),
        "--format",
        "gguf",
        "--out",
        str(tmp_path / "o"),
        "--gguf-type",
        "Q8_0",
        "--dtype",
        "float16",
    ]
    assert main(argv) == 0
    assert seen == [
        ExportJob.from_flat(
            {
                "source": str(tmp_path),
                "format": "gguf",
                "out": str(tmp_path / "o"),
                "gguf_type": "Q8_0",
                "dtype": "float16",
            }
        )
    ]


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--out", "o"], "needs --format"),
        (["--format", "hf"], "needs --out"),
        (["--format", "hf", "--out", "o", "--merge"], "--merge needs --recovery"),
        (["--format", "gguf", "--out", "o", "--gguf-type", "Q5_K"], "unknown --gguf-type"),
    ],
)
def test_bad_export_flags_are_one_line(argv, needle, capsys, tmp_path):
    assert main(["export", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1
