"""Numbers in manifests read as kubectl reads them (YAML 1.2), through `trainyard validate`."""

from __future__ import annotations

import pytest
import yaml

from tests.api.resources import run
from trainyard.cli.main import main


def _write(tmp_path, learning_rate: str):
    text = yaml.safe_dump(run().set("spec.training.learningRate", 0.5).doc, sort_keys=False)
    assert "learningRate: 0.5" in text
    path = tmp_path / "run.yaml"
    path.write_text(text.replace("learningRate: 0.5", f"learningRate: {learning_rate}"))
    return path


@pytest.mark.parametrize("written", ["1e-5", "2E-4", "1.0e-5", "0.00001", "+3e-6"])
def test_exponent_without_a_dot_is_a_number(written, tmp_path, capsys):
    # PyYAML's safe loader alone reads 1e-5 as the string '1e-5', which the strict model
    # (and the CRD's type: number) refuses; kubectl reads a number.
    path = _write(tmp_path, written)
    assert main(["validate", str(path)]) == 0, capsys.readouterr().out
    assert capsys.readouterr().out.endswith(": ok\n")


@pytest.mark.parametrize("written", ["'1e-5'", "fast"])
def test_a_quoted_or_word_value_is_still_refused(written, tmp_path, capsys):
    path = _write(tmp_path, written)
    assert main(["validate", str(path)]) == 1
    assert "spec.training.learningRate: must be a valid number" in capsys.readouterr().out


def test_kubectl_get_output_validates_with_its_server_set_metadata(tmp_path, capsys):
    document = run().doc
    document["metadata"].update(
        uid="5f1c9a6e-0d2b-4c1e-9a57-3b1f0e2d7c44",
        resourceVersion="48213",
        generation=2,
        creationTimestamp="2026-11-23T10:00:00Z",
        managedFields=[{"manager": "kubectl-client-side-apply", "operation": "Update"}],
        finalizers=["trainyard.dev/cleanup"],
    )
    document["status"] = {"phase": "Running"}
    text = yaml.safe_dump(document, sort_keys=False)
    # kubectl quotes timestamps; a hand-edited file may not (YAML then reads a datetime).
    path = tmp_path / "run.yaml"
    path.write_text(text.replace("'2026-11-23T10:00:00Z'", "2026-11-23T10:00:00Z"))
    assert "creationTimestamp: 2026-11-23T10:00:00Z" in path.read_text()
    assert main(["validate", str(path)]) == 0, capsys.readouterr().out
