"""The drill runner: inputs, outcomes, timeouts, reports, secret scan, signatures."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from click.testing import CliRunner

from trekeys.cli import main
from trekeys.custody import read_share_file
from trekeys.drills import (
    KERNEL_DIED,
    PASSED,
    TIMED_OUT,
    changes_keys,
    run_drills,
    select_notebooks,
)
from trekeys.errors import DrillError, IntegrityError, LabError
from trekeys.lab import Lab
from trekeys.report_worker import ReportWorker
from trekeys.signing import SIGNING_KEY_ID, ensure_signing_key, verify_run_folder


def write_notebook(
    folder: Path, name: str, *cells: str, params: str = "", mutating: bool = False
) -> Path:
    """Write a runbook whose parameters cell declares lab_dir, then `cells`."""
    folder.mkdir(parents=True, exist_ok=True)
    parameters = nbformat.v4.new_code_cell(f'lab_dir = "lab"\n{params}')
    parameters.metadata["tags"] = ["parameters"]
    notebook = nbformat.v4.new_notebook(
        cells=[parameters, *[nbformat.v4.new_code_cell(c) for c in cells]]
    )
    notebook.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    notebook.metadata["trekeys"] = {"changes_keys": mutating}
    path = folder / f"{name}.ipynb"
    nbformat.write(notebook, path)
    return path


@pytest.fixture
def books(tmp_path: Path) -> Path:
    """A folder of small runbooks for the runner's own tests."""
    folder = tmp_path / "books"
    write_notebook(
        folder,
        "10-ok",
        "from trekeys import runbook\n"
        "checks = runbook.Checklist('ok')\n"
        "checks.check('count is right', count == 3, f'count {count}')",
        params="count = 3\nlabel = 'x'\nverbose = False\nratio = 0.5",
    )
    write_notebook(folder, "20-raises", "raise RuntimeError('step 2 broke')")
    write_notebook(
        folder,
        "30-slow",
        *["import time\ntime.sleep(1)"] * 6,
    )
    write_notebook(
        folder, "40-crash", "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)"
    )
    write_notebook(
        folder,
        "50-leak",
        "from trekeys.lab import Lab\n"
        "with Lab.load(lab_dir).open_vault() as vault:\n"
        f"    print(vault.read_secret('{SIGNING_KEY_ID}', 'test').hex())",
    )
    return folder


def read_summary(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text())


def error_cells(path: Path) -> list[int]:
    notebook = nbformat.read(path, as_version=4)
    return [
        index
        for index, cell in enumerate(notebook.cells)
        if any(o.get("output_type") == "error" for o in cell.get("outputs", []))
    ]


# Bad input: each is rejected before anything runs.


def test_unknown_drill_name_rejected(bare_lab: Lab, books: Path, tmp_path: Path):
    out = tmp_path / "reports"
    with pytest.raises(DrillError, match="unknown drill nope; known drills: ok"):
        run_drills(bare_lab.root, out, names=["nope"], notebooks_folder=books)
    assert not out.exists()


def test_unknown_parameter_rejected(bare_lab: Lab, books: Path, tmp_path: Path):
    out = tmp_path / "reports"
    with pytest.raises(DrillError, match="unknown parameter colour .*known parameters"):
        run_drills(
            bare_lab.root,
            out,
            names=["ok"],
            parameters={"colour": "red"},
            notebooks_folder=books,
        )
    assert not out.exists()


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [("count", "three", "int"), ("verbose", "maybe", "bool"), ("ratio", "x", "float")],
)
def test_wrong_parameter_type_rejected(
    bare_lab: Lab, books: Path, tmp_path: Path, name: str, value: str, expected: str
):
    out = tmp_path / "reports"
    with pytest.raises(
        DrillError, match=f"parameter {name} of drill ok must be of type {expected}"
    ):
        run_drills(
            bare_lab.root,
            out,
            names=["ok"],
            parameters={name: value},
            notebooks_folder=books,
        )
    assert not out.exists()


def test_lab_dir_parameter_rejected(bare_lab: Lab, books: Path, tmp_path: Path):
    with pytest.raises(DrillError, match="set by the runner; use --lab"):
        run_drills(
            bare_lab.root,
            tmp_path / "reports",
            names=["ok"],
            parameters={"lab_dir": "/elsewhere"},
            notebooks_folder=books,
        )


def test_missing_lab_rejected(books: Path, tmp_path: Path):
    with pytest.raises(LabError, match="does not exist; create it with"):
        run_drills(tmp_path / "nolab", tmp_path / "reports", notebooks_folder=books)
    assert not (tmp_path / "reports").exists()


def test_folder_that_is_not_a_lab_rejected(books: Path, tmp_path: Path):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "notes.txt").write_text("keep me")
    with pytest.raises(LabError, match="is not a trekeys lab"):
        run_drills(plain, tmp_path / "reports", notebooks_folder=books)
    assert (plain / "notes.txt").read_text() == "keep me"


def test_unwritable_report_folder_rejected(bare_lab: Lab, books: Path, tmp_path: Path):
    # A regular file as parent cannot hold a folder, even for root.
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    with pytest.raises(DrillError, match="is not writable .*choose another with --out"):
        run_drills(
            bare_lab.root, blocker / "reports", names=["ok"], notebooks_folder=books
        )
    assert blocker.read_text() == "not a folder"


def test_notebook_without_parameters_cell_rejected(bare_lab: Lab, tmp_path: Path):
    folder = tmp_path / "books"
    folder.mkdir()
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")])
    nbformat.write(notebook, folder / "10-plain.ipynb")
    with pytest.raises(DrillError, match="has no parameters cell declaring lab_dir"):
        run_drills(bare_lab.root, tmp_path / "reports", notebooks_folder=folder)


# Outcomes.


def test_passing_drill_writes_reports(bare_lab: Lab, books: Path, tmp_path: Path):
    run = run_drills(
        bare_lab.root,
        tmp_path / "reports",
        names=["ok"],
        parameters={"label": "weekly", "verbose": "true"},
        notebooks_folder=books,
    )

    assert run.passed
    summary = read_summary(run.folder)
    drill = summary["drills"][0]
    assert drill["outcome"] == PASSED
    assert drill["parameters"]["label"] == "weekly"
    assert drill["parameters"]["verbose"] is True
    assert drill["checks"] == [
        {
            "procedure": "ok",
            "name": "count is right",
            "passed": True,
            "detail": "count 3",
            "policy": "",
        }
    ]
    assert drill["started"] <= drill["ended"]
    assert (run.folder / "ok.ipynb").is_file()
    assert "count is right" in (run.folder / "ok.html").read_text()
    assert not list(run.folder.glob("*.checks.jsonl"))


def test_summary_records_evidence(bare_lab: Lab, books: Path, tmp_path: Path):
    run = run_drills(
        bare_lab.root, tmp_path / "reports", names=["ok"], notebooks_folder=books
    )

    evidence = read_summary(run.folder)["evidence"]
    for item in ("user", "host", "trekeys", "python", "cryptsetup", "gpg"):
        assert evidence[item], item
    assert evidence["vault KDF"].startswith("Argon2")
    assert evidence["vault cipher"]
    first_cell = nbformat.read(run.folder / "ok.ipynb", as_version=4).cells[0]
    assert "trekeys-evidence" in first_cell.metadata["tags"]
    assert "cryptsetup" in first_cell.source


def test_failing_cell_fails_drill_and_stays_visible(
    bare_lab: Lab, books: Path, tmp_path: Path
):
    run = run_drills(
        bare_lab.root,
        tmp_path / "reports",
        names=["ok", "raises"],
        notebooks_folder=books,
    )

    assert not run.passed
    outcomes = {d.name: d.outcome for d in run.drills}
    assert outcomes == {"ok": "passed", "raises": "failed"}
    assert "step 2 broke" in run.drills[1].error
    assert error_cells(run.folder / "raises.ipynb")
    assert "step 2 broke" in (run.folder / "raises.html").read_text()


def test_html_of_each_drill_has_evidence_cell(
    bare_lab: Lab, books: Path, tmp_path: Path
):
    # The HTML is rendered in a background process while the next drill runs,
    # so it must still include the evidence cell, also for a failed drill.
    run = run_drills(
        bare_lab.root,
        tmp_path / "reports",
        names=["ok", "raises"],
        notebooks_folder=books,
    )

    for name in ("ok", "raises"):
        html = (run.folder / f"{name}.html").read_text()
        assert "Drill evidence" in html, name
        assert "vault KDF" in html, name
        assert run.folder.name in html, name
    assert "failed: RuntimeError" in (run.folder / "raises.html").read_text()
    assert verify_run_folder(run.folder).files_checked == 5


def test_reports_written_without_worker(
    bare_lab: Lab, books: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # A worker that exits at once writes nothing, so the runner writes every
    # report itself after the last drill.
    monkeypatch.setattr(ReportWorker, "command", ["false"])
    run = run_drills(
        bare_lab.root,
        tmp_path / "reports",
        names=["ok", "raises"],
        notebooks_folder=books,
    )

    outcomes = {d.name: d.outcome for d in run.drills}
    assert outcomes == {"ok": "passed", "raises": "failed"}
    for name in ("ok", "raises"):
        assert "Drill evidence" in (run.folder / f"{name}.html").read_text(), name
    assert verify_run_folder(run.folder).files_checked == 5


def test_evidence_lists_keys_drill_touched(bare_lab: Lab, tmp_path: Path):
    with bare_lab.open_vault() as vault:
        ensure_signing_key(vault)
        fingerprint = vault.get(SIGNING_KEY_ID).fingerprint
    books = tmp_path / "books"
    write_notebook(
        books,
        "10-touch",
        "from trekeys.lab import Lab\n"
        "with Lab.load(lab_dir).open_vault() as vault:\n"
        f"    material = vault.read_secret('{SIGNING_KEY_ID}', 'test')",
    )
    run = run_drills(bare_lab.root, tmp_path / "reports", notebooks_folder=books)

    assert run.passed
    touched = read_summary(run.folder)["drills"][0]["keys_touched"]
    assert [key["key"] for key in touched] == [SIGNING_KEY_ID]
    assert touched[0]["fingerprint"] == fingerprint
    html = (run.folder / "touch.html").read_text()
    assert SIGNING_KEY_ID in html
    assert fingerprint in html


def test_whole_notebook_timeout(bare_lab: Lab, books: Path, tmp_path: Path):
    # Six cells of one second each: no single cell reaches the 2.5 s limit.
    run = run_drills(
        bare_lab.root,
        tmp_path / "reports",
        names=["slow"],
        timeout=2.5,
        notebooks_folder=books,
    )

    drill = run.drills[0]
    assert drill.outcome == TIMED_OUT
    assert "timeout of 2.5 s" in drill.error
    assert not run.passed
    notebook = nbformat.read(run.folder / "slow.ipynb", as_version=4)
    stopped = [
        c
        for c in notebook.cells
        if any(o.get("ename") == "DrillTimeout" for o in c.get("outputs", []))
    ]
    assert len(stopped) == 1
    assert read_summary(run.folder)["drills"][0]["outcome"] == "timed out"


def test_kernel_death_reported(bare_lab: Lab, books: Path, tmp_path: Path):
    run = run_drills(
        bare_lab.root, tmp_path / "reports", names=["crash"], notebooks_folder=books
    )

    drill = run.drills[0]
    assert drill.outcome == KERNEL_DIED
    assert "kernel died" in drill.error
    assert error_cells(run.folder / "crash.ipynb")


def test_each_drill_gets_fresh_kernel(bare_lab: Lab, tmp_path: Path):
    books = tmp_path / "fresh"
    for name in ("10-first", "20-second"):
        write_notebook(
            books,
            name,
            "import os\nprint('pid', os.getpid())\n"
            "print('leftover' in globals())\nleftover = 1",
        )

    run = run_drills(bare_lab.root, tmp_path / "reports", notebooks_folder=books)

    assert run.passed
    outputs = []
    for name in ("first", "second"):
        cell = nbformat.read(run.folder / f"{name}.ipynb", as_version=4).cells[-1]
        outputs.append(cell.outputs[0]["text"].split())
    assert outputs[0][1] != outputs[1][1]  # different kernel processes
    assert outputs[0][2] == "False"
    assert outputs[1][2] == "False"  # nothing left over from the first drill


def test_timeout_spares_next_drill(bare_lab: Lab, books: Path, tmp_path: Path):
    # The next drill's kernel is already starting when the slow one is killed.
    run = run_drills(
        bare_lab.root,
        tmp_path / "reports",
        names=["ok", "slow", "raises"],
        timeout=2.5,
        notebooks_folder=books,
    )

    results = {d.name: d for d in run.drills}
    assert results["ok"].outcome == PASSED
    assert results["slow"].outcome == TIMED_OUT
    assert results["raises"].outcome == "failed"
    assert "step 2 broke" in results["raises"].error


def test_runs_never_overwrite(bare_lab: Lab, books: Path, tmp_path: Path):
    out = tmp_path / "reports"
    first = run_drills(bare_lab.root, out, names=["ok"], notebooks_folder=books)
    before = (first.folder / "ok.ipynb").read_bytes()
    second = run_drills(bare_lab.root, out, names=["ok"], notebooks_folder=books)

    assert first.folder != second.folder
    assert (first.folder / "ok.ipynb").read_bytes() == before
    index = (out / "index.html").read_text()
    assert index.index(second.folder.name) < index.index(first.folder.name)


# Secret scan and signed manifest.


def test_leaked_key_fails_run_naming_cell(bare_lab: Lab, books: Path, tmp_path: Path):
    with bare_lab.open_vault() as vault:
        ensure_signing_key(vault)
    run = run_drills(
        bare_lab.root, tmp_path / "reports", names=["leak"], notebooks_folder=books
    )

    assert not run.passed
    scan = read_summary(run.folder)["secret_scan"]
    assert scan["passed"] is False
    leaked = {(f["file"], f["secret"]) for f in scan["findings"]}
    assert ("leak.ipynb", f"key {SIGNING_KEY_ID}") in leaked
    assert ("leak.html", f"key {SIGNING_KEY_ID}") in leaked
    # Cell 0 is the evidence cell, 1 the parameters, 2 papermill's injected ones.
    located = {f["file"]: f["location"] for f in scan["findings"]}
    assert located["leak.ipynb"] == "cell 3 (In [3])"
    assert located["leak.html"] == "cell 3"
    assert "key material in the report" in run.drills[0].error

    with bare_lab.open_vault() as vault:
        material = vault.read_secret(SIGNING_KEY_ID, "test").hex().encode()
    for name in ("leak.ipynb", "leak.html"):
        content = (run.folder / name).read_bytes()
        assert material not in content
        assert b"withheld by trekeys" in content
    assert verify_run_folder(run.folder).files_checked == 3


def test_secret_parameter_rejected_before_running(
    bare_lab: Lab, books: Path, tmp_path: Path
):
    words = read_share_file(bare_lab.share_files()[0])
    out = tmp_path / "reports"

    with pytest.raises(DrillError, match="parameter label of drill ok contains key"):
        run_drills(
            bare_lab.root,
            out,
            names=["ok"],
            parameters={"label": words},
            notebooks_folder=books,
        )

    assert not out.exists()


def test_manifest_verifies_and_names_edited_file(
    bare_lab: Lab, books: Path, tmp_path: Path
):
    run = run_drills(
        bare_lab.root, tmp_path / "reports", names=["ok"], notebooks_folder=books
    )
    result = verify_run_folder(run.folder)
    assert result.files_checked == 3

    report = run.folder / "ok.html"
    data = bytearray(report.read_bytes())
    data[100] ^= 0x01
    report.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="ok.html was edited"):
        verify_run_folder(run.folder)


def test_manifest_rejects_added_and_removed_files(
    bare_lab: Lab, books: Path, tmp_path: Path
):
    run = run_drills(
        bare_lab.root, tmp_path / "reports", names=["ok"], notebooks_folder=books
    )
    (run.folder / "ok.ipynb").unlink()
    (run.folder / "extra.html").write_text("<p>added later</p>")

    with pytest.raises(IntegrityError) as raised:
        verify_run_folder(run.folder)
    assert "ok.ipynb is missing" in str(raised.value)
    assert "extra.html is not in the manifest" in str(raised.value)


def test_manifest_signature_edit_detected(bare_lab: Lab, books: Path, tmp_path: Path):
    run = run_drills(
        bare_lab.root, tmp_path / "reports", names=["ok"], notebooks_folder=books
    )
    manifest = run.folder / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"bytes": ', '"bytes": 1'))

    with pytest.raises(IntegrityError, match="fails its signature check"):
        verify_run_folder(run.folder)


def test_manifest_from_untrusted_key_rejected(
    bare_lab: Lab, books: Path, tmp_path: Path
):
    run = run_drills(
        bare_lab.root, tmp_path / "reports", names=["ok"], notebooks_folder=books
    )
    with pytest.raises(IntegrityError, match="not the trusted report-signing key"):
        verify_run_folder(run.folder, fingerprint="00" * 32)


def test_signing_key_lists_each_signed_run(bare_lab: Lab, books: Path, tmp_path: Path):
    out = tmp_path / "reports"
    first = run_drills(bare_lab.root, out, names=["ok"], notebooks_folder=books)
    second = run_drills(bare_lab.root, out, names=["ok"], notebooks_folder=books)

    with bare_lab.open_vault(read_only=True) as vault:
        record = vault.get(SIGNING_KEY_ID)
    assert f"report:{first.folder.name}" in record.signs
    assert f"report:{second.folder.name}" in record.signs
    manifest = json.loads((second.folder / "manifest.json").read_text())
    assert manifest["signing_key"]["fingerprint"] == record.fingerprint


def test_unopenable_vault_fails_run(bare_lab: Lab, tmp_path: Path):
    books = tmp_path / "away"
    keyfile = bare_lab.keyfile_path
    write_notebook(
        books, "10-hide-keyfile", f"import os\nos.rename('{keyfile}', '{keyfile}.away')"
    )

    run = run_drills(bare_lab.root, tmp_path / "reports", notebooks_folder=books)

    assert run.drills[0].outcome == PASSED
    assert not run.passed
    assert "neither scanned for secrets nor signed" in run.errors[0]
    summary = read_summary(run.folder)
    assert summary["passed"] is False
    assert not (run.folder / "manifest.json").exists()


# The command line.


def test_cli_exit_status_follows_outcome(
    bare_lab: Lab, books: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("TREKEYS_NOTEBOOKS", str(books))
    out = str(tmp_path / "reports")
    cli = CliRunner()
    lab = str(bare_lab.root)

    passed = cli.invoke(main, ["drill", "ok", "--lab", lab, "--out", out])
    failed = cli.invoke(main, ["drill", "raises", "--lab", lab, "--out", out])

    assert passed.exit_code == 0, passed.output
    assert "passed      ok" in passed.output
    assert failed.exit_code == 1
    assert "failed      raises" in failed.output


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["nope"], "unknown drill nope"),
        (["ok", "--param", "colour=red"], "unknown parameter colour"),
        (["ok", "--param", "count=three"], "parameter count of drill ok must be"),
        (["ok", "--param", "count"], "parameter 'count' is invalid; write it as"),
    ],
)
def test_cli_reports_bad_input(
    bare_lab: Lab,
    books: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    arguments: list[str],
    message: str,
):
    monkeypatch.setenv("TREKEYS_NOTEBOOKS", str(books))
    out = tmp_path / "reports"
    result = CliRunner().invoke(
        main, ["drill", *arguments, "--lab", str(bare_lab.root), "--out", str(out)]
    )
    assert result.exit_code == 1
    assert f"Error: {message}" in result.output
    assert not out.exists()


def test_cli_report_verify(bare_lab: Lab, books: Path, tmp_path: Path):
    run = run_drills(
        bare_lab.root, tmp_path / "reports", names=["ok"], notebooks_folder=books
    )
    cli = CliRunner()
    trusted = ["--lab", str(bare_lab.root)]
    good = cli.invoke(main, ["report", "verify", str(run.folder), *trusted])
    assert good.exit_code == 0, good.output
    assert "3 files match the manifest" in good.output

    notebook = run.folder / "ok.ipynb"
    notebook.write_bytes(notebook.read_bytes().replace(b"count", b"cOunt", 1))
    bad = cli.invoke(main, ["report", "verify", str(run.folder), *trusted])
    assert bad.exit_code == 1
    assert "ok.ipynb was edited" in bad.output


def test_cli_report_verify_needs_trusted_key(bare_lab: Lab, books: Path, tmp_path):
    run = run_drills(
        bare_lab.root, tmp_path / "reports", names=["ok"], notebooks_folder=books
    )
    cli = CliRunner()

    untrusted = cli.invoke(main, ["report", "verify", str(run.folder)])
    prefix = cli.invoke(
        main, ["report", "verify", str(run.folder), "--fingerprint", "3d1c90ca"]
    )

    assert untrusted.exit_code == 2
    assert "give --fingerprint or --lab" in untrusted.output
    assert prefix.exit_code == 2
    assert "full fingerprint of 64 hex digits" in prefix.output


def test_safe_only_skips_drills_that_change_keys(books: Path):
    write_notebook(books, "60-rotate", "x = 1", mutating=True)

    every = select_notebooks(None, books)
    safe = select_notebooks(None, books, safe_only=True)

    assert "rotate" in every
    assert "rotate" not in safe
    assert "ok" in safe


def test_safe_only_rejects_named_drill_that_changes_keys(books: Path):
    write_notebook(books, "60-rotate", "x = 1", mutating=True)

    with pytest.raises(DrillError, match="drill rotate changes keys"):
        select_notebooks(["rotate"], books, safe_only=True)


def test_runbook_without_declaration_counts_as_changing_keys(tmp_path: Path):
    path = write_notebook(tmp_path / "books", "10-old", "x = 1")
    notebook = nbformat.read(path, as_version=4)
    del notebook.metadata["trekeys"]
    nbformat.write(notebook, path)

    assert changes_keys(path) is True
