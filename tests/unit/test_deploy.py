"""Deployment files: no container engine runs here, so they are linted, not run."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

BIN = Path(sys.executable).parent
CAPS = {"CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"}


def tool(name: str) -> str:
    path = shutil.which(name, path=str(BIN)) or shutil.which(name)
    assert path, f"{name} missing: `make setup` installs it (pip: see pyproject dev extras)"
    return path


def test_containerfile_passes_hadolint() -> None:
    res = subprocess.run([tool("hadolint"), "--no-color", "Containerfile"], cwd=ROOT, capture_output=True, text=True,
                         check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def test_hadolint_is_really_checking(tmp_path: Path) -> None:
    bad = tmp_path / "Containerfile"
    bad.write_text("FROM debian\nRUN cd /tmp && apt-get install foo\n")
    res = subprocess.run([tool("hadolint"), "--no-color", str(bad)], capture_output=True, text=True, check=False)
    assert res.returncode != 0


@pytest.mark.parametrize("manifest", ["daemonset.yaml", "sidecar.yaml"])
def test_kubernetes_manifests_validate(manifest: str) -> None:
    res = subprocess.run([tool("kubernetes-validate"), "--strict", f"config/kubernetes/{manifest}"], cwd=ROOT,
                         capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "passed" in res.stdout + res.stderr


def test_kubernetes_validation_rejects_a_typo(tmp_path: Path) -> None:
    text = (Path(ROOT) / "config/kubernetes/sidecar.yaml").read_text().replace("containerPort", "containerPrt")
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    res = subprocess.run([tool("kubernetes-validate"), "--strict", str(bad)], capture_output=True, text=True,
                         check=False)
    assert res.returncode != 0


def test_manifests_grant_only_the_documented_capabilities() -> None:
    for name in ("daemonset.yaml", "sidecar.yaml"):
        text = (Path(ROOT) / "config/kubernetes" / name).read_text()
        assert 'drop: ["ALL"]' in text
        assert 'add: ["BPF", "PERFMON", "NET_ADMIN"]' in text
        assert "privileged: true" not in text and "SYS_ADMIN" not in text


def test_manifests_probe_the_ready_file_they_ask_for() -> None:
    for name in ("daemonset.yaml", "sidecar.yaml"):
        text = (Path(ROOT) / "config/kubernetes" / name).read_text()
        path = re.search(r'"--ready-file", "([^"]+)"', text)
        assert path, f"{name}: no --ready-file"
        assert f'command: ["test", "-f", "{path.group(1)}"]' in text, f"{name}: no readinessProbe on {path.group(1)}"
        assert path.group(1).startswith("/tmp/"), "the root filesystem is read-only: the file goes to the emptyDir"


def test_systemd_unit_is_hardened() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(Path(ROOT) / "config/systemd/xdpflow.service")
    svc = unit["Service"]
    assert set(svc["CapabilityBoundingSet"].split()) == CAPS
    assert set(svc["AmbientCapabilities"].split()) == CAPS
    assert svc["ProtectSystem"] == "strict"
    assert svc["Restart"] == "on-failure"
    assert svc["NoNewPrivileges"] == "yes"
    assert "-HUP" in svc["ExecReload"]
    assert svc["ExecStart"].split()[1] == "run"
    # Readiness: the exporter's main process sends READY=1 (exporter/readiness.py).
    assert svc["Type"] == "notify" and svc["NotifyAccess"] == "main"
