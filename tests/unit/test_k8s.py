"""The Kubernetes manifests: generated from the `pdserve up --groups` layout, rendered by
``kubectl kustomize`` and validated with ``kubernetes-validate --strict`` (offline)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import gen_k8s  # noqa: E402

from services.launcher import parse_groups  # noqa: E402

pytestmark = pytest.mark.unit
KUBECTL = shutil.which("kubectl")
VALIDATE = Path(sys.executable).parent / "kubernetes-validate"
needs_tools = pytest.mark.skipif(KUBECTL is None or not VALIDATE.exists(),
                                 reason="kubectl or kubernetes-validate missing "
                                        "(scripts/test.sh installs both)")


def _write(tmp: Path, groups: str) -> Path:
    for rel, text in gen_k8s.render(parse_groups(groups)).items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_text(text)
    return tmp


def _kustomize(d: Path) -> list[dict]:  # type: ignore[type-arg]
    assert KUBECTL is not None
    out = subprocess.run([KUBECTL, "kustomize", str(d)], capture_output=True, text=True,
                         check=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def test_committed_manifests_are_up_to_date() -> None:
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_k8s.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@needs_tools
def test_each_group_overlay_carries_its_ratio_labels_and_group(tmp_path: Path) -> None:
    d = _write(tmp_path, "code:4p2d,chat:2p6d")
    docs = _kustomize(d / "overlays" / "cluster")
    deps = {x["metadata"]["name"]: x for x in docs if x["kind"] == "Deployment"}
    assert set(deps) == {"code-prefill", "code-decode", "chat-prefill", "chat-decode",
                         "gateway", "kvstore"}
    want = {("code", "prefill"): 4, ("code", "decode"): 2, ("chat", "prefill"): 2,
            ("chat", "decode"): 6}
    for (group, role), n in want.items():
        dep = deps[f"{group}-{role}"]
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert dep["spec"]["replicas"] == n
        assert labels[gen_k8s.LABEL_SCENARIO] == group and labels[gen_k8s.LABEL_ROLE] == role
        assert dep["spec"]["selector"]["matchLabels"][gen_k8s.LABEL_SCENARIO] == group
        env = {e["name"]: e.get("value") for e in
               dep["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["PDSERVE_GROUP"] == group  # overrides the ConfigMap's default group
    kinds = {(x["kind"], x["metadata"]["name"]) for x in docs}
    assert ("StatefulSet", "redis") in kinds and ("Service", "gateway") in kinds
    # Services select only their own group's pods.
    svc = next(x for x in docs if x["kind"] == "Service" and x["metadata"]["name"] ==
               "chat-prefill")
    assert svc["spec"]["selector"][gen_k8s.LABEL_SCENARIO] == "chat"


@needs_tools
def test_every_rendered_kustomization_validates_strictly(tmp_path: Path) -> None:
    d = _write(tmp_path / "k8s", "code:4p2d,chat:2p6d")
    r = subprocess.run(["bash", str(ROOT / "scripts" / "check_k8s.sh")],
                       env={"K8S_DIR": str(d), "PATH": f"{Path(KUBECTL).parent}:/usr/bin:/bin",
                            "KUBERNETES_VALIDATE": str(VALIDATE)},
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "6 kustomizations rendered and valid" in r.stdout


@needs_tools
def test_the_validator_rejects_a_bad_manifest(tmp_path: Path) -> None:
    d = _write(tmp_path, "code:1p1d")
    dep = d / "base" / "workers" / "prefill.yaml"
    dep.write_text(dep.read_text().replace("replicas: 1", 'replicas: "three"', 1))
    out = tmp_path / "rendered.yaml"
    out.write_text(yaml.safe_dump_all(_kustomize(d / "base" / "workers")))
    r = subprocess.run([str(VALIDATE), "-k", "1.32.0", "--strict", "--quiet", str(out)],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "replicas" in r.stdout + r.stderr


def test_layout_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="expected name"):
        gen_k8s.render(parse_groups("code:4x"))
