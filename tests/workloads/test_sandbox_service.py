"""Strict code-execution rewards on a cluster whose trainer namespaces enforce the
restricted Pod Security Standard: the rendered pods checked against the standard, and
the sandbox service started on this machine with exactly the command and environment
its rendered pod runs, the reward calling into it over HTTP.

The sandbox server needs root with CAP_SYS_ADMIN (as in its pod); these tests fail,
saying so, where the machine has neither.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from trainyard.api import parse_resource
from trainyard.api.rewards import SANDBOX_URL_ENV
from trainyard.operator.builders import sandbox
from trainyard.operator.builders.job import TRAINER_CONTAINER, render_worker_job
from trainyard.workloads.rewards import build_reward_functions
from trainyard.workloads.rewards.sandbox import SandboxUnavailable, require_isolation

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "grpo-code-execution.yaml"

# ------------------------------------------------------------ Pod Security Standards
# One check for every pod Trainyard makes (the chart's and the operator's): its controls
# per level, and a table showing it catches each one (tests/chart/test_sandbox.py).
sys.path.insert(0, str(REPO / "tests" / "chart"))
from pod_security import violations as pss_violations  # noqa: E402


def trainer_pod(document: dict) -> dict:
    job = render_worker_job(parse_resource(document), uid="uid-1")
    return job["spec"]["template"]["spec"]


def example_run() -> dict:
    return next(d for d in yaml.safe_load_all(EXAMPLE.read_text()) if d["kind"] == "TrainingRun")


def by_kind(manifests: list[dict]) -> dict[str, dict]:
    return {m["kind"]: m for m in manifests}


@pytest.mark.parametrize(
    ("mutate", "level", "found"),
    [
        pytest.param(lambda p, c: c.update(privileged=True), "baseline", "privileged", id="priv"),
        pytest.param(lambda p, c: p.update(hostNetwork=True), "baseline", "hostNetwork", id="net"),
        pytest.param(
            lambda p, c: p["volumes"].append({"name": "h", "hostPath": {"path": "/"}}),
            "baseline",
            "hostPath",
            id="host-path",
        ),
        pytest.param(
            lambda p, c: c["capabilities"].update(add=["SYS_ADMIN"]),
            "baseline",
            "SYS_ADMIN",
            id="sys-admin",
        ),
        pytest.param(
            lambda p, c: c["capabilities"].update(add=["CHOWN"]), "restricted", "CHOWN", id="chown"
        ),
        pytest.param(
            lambda p, c: c.update(runAsNonRoot=False), "restricted", "runAsNonRoot", id="root"
        ),
        pytest.param(
            lambda p, c: c.update(allowPrivilegeEscalation=True),
            "restricted",
            "allowPrivilegeEscalation",
            id="escalation",
        ),
        pytest.param(
            lambda p, c: c.update(seccompProfile={"type": "Unconfined"}),
            "restricted",
            "seccompProfile",
            id="seccomp",
        ),
    ],
)
def test_the_standard_check_catches_each_control(mutate, level, found):
    """The check the pods are held to can fail: each control, broken once."""
    pod = trainer_pod(example_run())
    assert pss_violations(pod, "restricted") == []
    mutate(pod, pod["containers"][0]["securityContext"])
    assert any(found in violation for violation in pss_violations(pod, level))


def test_the_example_uses_the_sandbox_service_and_its_trainer_pod_is_restricted():
    pod = trainer_pod(example_run())
    assert pss_violations(pod, "restricted") == []
    (trainer,) = [c for c in pod["containers"] if c["name"] == TRAINER_CONTAINER]
    env = {e["name"]: e.get("value") for e in trainer["env"]}
    rendered = by_kind(sandbox.render_sandbox_service(image="trainer:test"))
    service = rendered["Service"]
    port = service["spec"]["ports"][0]["port"]
    name, namespace = service["metadata"]["name"], service["metadata"]["namespace"]
    assert env[SANDBOX_URL_ENV] == f"http://{name}.{namespace}.svc:{port}"
    # The NetworkPolicy lets exactly these pods in.
    allowed = rendered["NetworkPolicy"]["spec"]["ingress"][0]["from"][0]["podSelector"]
    assert allowed["matchLabels"]["app.kubernetes.io/component"] == "worker"
    pod_labels = render_worker_job(parse_resource(example_run()), uid="u")["spec"]["template"][
        "metadata"
    ]["labels"]
    assert allowed["matchLabels"].items() <= pod_labels.items()


def test_gate_evaluation_pods_reach_the_service_too():
    """A gate's reward suite scores with the judged run's rewards, in its own pod."""
    from trainyard.api.gate import evaluation_task
    from trainyard.operator.builders.evaluation import render_evaluation

    run = parse_resource(example_run())
    gate = parse_resource(
        {
            "apiVersion": "trainyard.dev/v1alpha1",
            "kind": "PromotionGate",
            "metadata": {"name": "code-release", "namespace": "team"},
            "spec": {
                "run": "code-grpo",
                "criteria": ["reward_mean >= 0.5"],
                "evaluation": {"suite": ["reward"], "dataset": "s3://datasets/mbpp/test.jsonl"},
            },
        }
    )
    task = evaluation_task(
        gate.spec.evaluation, model=run.spec.model, output="s3://x/eval", run=run.spec
    )
    job = render_evaluation(gate, task, uid="u", attempt=0, run=run)[-1]
    pod = job["spec"]["template"]
    assert pss_violations(pod["spec"], "restricted") == []
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    assert env[SANDBOX_URL_ENV].startswith("http://trainyard-sandbox.trainyard-sandbox.svc:")
    policy = by_kind(sandbox.render_sandbox_service())["NetworkPolicy"]
    peers = policy["spec"]["ingress"][0]["from"]
    labels = pod["metadata"]["labels"]
    assert any(peer["podSelector"]["matchLabels"].items() <= labels.items() for peer in peers)


@pytest.mark.parametrize(
    ("runtime", "namespace_level", "refused_by"),
    [
        pytest.param("namespaces", "privileged", {"baseline", "restricted"}, id="jail-in-pod"),
        pytest.param("gvisor", "restricted", set(), id="gvisor"),
    ],
)
def test_sandbox_pods_are_admitted_where_their_namespace_says(runtime, namespace_level, refused_by):
    rendered = by_kind(sandbox.render_sandbox_service(image="trainer:test", runtime=runtime))
    labels = rendered["Namespace"]["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == namespace_level
    pod = rendered["Deployment"]["spec"]["template"]["spec"]
    for level in ("privileged", "baseline", "restricted"):
        assert bool(pss_violations(pod, level)) == (level in refused_by), (level, pod)
    assert pss_violations(pod, namespace_level) == []
    assert pod["automountServiceAccountToken"] is False
    if runtime == "namespaces":
        assert pod["hostUsers"] is False, "root and SYS_ADMIN only inside the pod's user namespace"
        assert rendered["NetworkPolicy"]["spec"]["egress"] == []
    else:
        assert pod["runtimeClassName"] == "gvisor"
        assert "rlimits" in pod["containers"][0]["args"]


def test_a_jail_sidecar_in_the_trainer_pod_would_be_refused_under_restricted():
    """Why the jail is not a sidecar: admission judges the whole pod."""
    pod = trainer_pod(example_run())
    jail = copy.deepcopy(
        by_kind(sandbox.render_sandbox_service(image="t"))["Deployment"]["spec"]["template"][
            "spec"
        ]["containers"][0]
    )
    pod["containers"].append(jail)
    assert any("SYS_ADMIN" in v for v in pss_violations(pod, "restricted"))
    assert any("SYS_ADMIN" in v for v in pss_violations(pod, "baseline"))


# ---------------------------------------------------- the rendered command, run here
def strict_problem() -> str | None:
    try:
        require_isolation("strict")
    except SandboxUnavailable as error:
        return str(error)
    return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# Root of a new user namespace whose uids and gids 0-65535 are 65536 unprivileged ids of
# this machine, in a mount namespace of its own: what the kubelet gives a pod with
# `hostUsers: false` (ids 1-65535 at HOST_BASE+1..; 0 stays 0 here, as the image's
# idmapped files are owned by the pod's root there). SIGTERM is passed on.
USER_NAMESPACE = """
import ctypes, os, signal, sys
libc = ctypes.CDLL(None, use_errno=True)
base, command = int(sys.argv[1]), sys.argv[2:]
ready, go = os.pipe(), os.pipe()
pid = os.fork()
if pid == 0:
    if libc.unshare(0x10000000 | 0x00020000) != 0:  # CLONE_NEWUSER | CLONE_NEWNS
        os._exit(99)
    os.write(ready[1], b"u")
    os.read(go[0], 1)
    os.setgid(0); os.setuid(0); os.setgroups([])
    os.execv(command[0], command)
if os.read(ready[0], 1) != b"u":
    sys.exit("unshare(CLONE_NEWUSER) failed")
for name in ("uid_map", "gid_map"):
    with open(f"/proc/{pid}/{name}", "w") as handle:
        handle.write(f"0 0 1\\n1 {base + 1} 65535\\n")
signal.signal(signal.SIGTERM, lambda *_: os.kill(pid, signal.SIGTERM))
os.write(go[1], b"g")
while True:
    try:
        _, status = os.waitpid(pid, 0)
        break
    except InterruptedError:
        continue
sys.exit(os.waitstatus_to_exitcode(status))
"""


@pytest.fixture(scope="module", params=["host", "user-namespace"])
def sandbox_service(request, tmp_path_factory):
    """The sandbox Deployment's container, started here with its rendered command, args
    and env (only the port swapped for a free one, and PYTHONPATH for this checkout):
    as root of this machine, and as root of a pod's own user namespace (hostUsers:
    false), where only the rendered TRAINYARD_SANDBOX_UIDS exist."""
    problem = strict_problem()
    if problem:
        pytest.fail(f"the sandbox server needs what its pod has: {problem}")
    deployment = by_kind(sandbox.render_sandbox_service(image="trainer:test", workers=2))[
        "Deployment"
    ]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    args = list(container["args"])
    port = free_port()
    args[args.index("--port") + 1] = str(port)
    command = [sys.executable if c == "python" else c for c in container["command"]]
    if request.param == "user-namespace":
        assert deployment["spec"]["template"]["spec"]["hostUsers"] is False
        command = [sys.executable, "-c", USER_NAMESPACE, "2000000", *command]
    env = {e["name"]: e["value"] for e in container["env"]}
    env["PATH"] = os.environ["PATH"]
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "operator"), str(REPO / "workloads")])
    env["HOME"] = tempfile.mkdtemp(prefix="trainyard-sandbox-home-")
    log_path = tmp_path_factory.mktemp("sandbox-server") / "stderr.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [*command, *args], env=env, stdout=subprocess.PIPE, stderr=log, text=True
        )
    line = process.stdout.readline()
    assert line.startswith("listening on "), log_path.read_text()
    url = f"http://127.0.0.1:{port}"
    yield SimpleNamespace(url=url, env=env, process=process, mode=request.param)
    process.terminate()
    assert process.wait(timeout=60) == 0, "SIGTERM stops the server cleanly"


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def test_the_rendered_server_reports_strict_isolation(sandbox_service):
    health = get_json(sandbox_service.url + "/healthz")
    assert health["isolation"] == "strict" and health["workers"] == 2
    if sandbox_service.mode == "user-namespace":
        pid = sandbox_service.process.pid
        (server,) = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        assert Path(f"/proc/{server}/uid_map").read_text().split() == [
            *("0", "0", "1"),
            *("1", "2000001", "65535"),
        ]


TESTS = "from solution import add\nassert add(2, 3) == 5\nimport os\nassert 10000 <= os.getuid() <= 65535, os.getuid()\n"
CORRECT = "```python\ndef add(a, b):\n    return a + b\n```"


def service_reward(args_overrides: dict | None = None):
    """The example's code-execution reward, bound as the trainer binds it."""
    spec = example_run()["spec"]["grpo"]["rewards"][0]
    args = {**spec["args"], **(args_overrides or {})}
    functions, _ = build_reward_functions(
        [
            SimpleNamespace(
                name=spec["name"], builtin="code_execution", python=None, weight=1.0, args=args
            )
        ]
    )
    return functions[0]


def test_reward_scores_through_the_rendered_server(sandbox_service, monkeypatch, tmp_path):
    monkeypatch.setenv(SANDBOX_URL_ENV, sandbox_service.url)
    reward = service_reward()
    trainer_port = free_port()
    listener = socket.create_server(("127.0.0.1", trainer_port))
    outside = tmp_path / "escaped.txt"
    tmp_path.chmod(0o777)
    attacks = [
        f"import socket\nsocket.create_connection(('127.0.0.1', {trainer_port}), timeout=2)",
        f"open({str(outside)!r}, 'w').write('escaped')",
    ]
    completions = [
        CORRECT,
        "def add(a, b):\n    return a - b",
        *[f"```python\n{code}\ndef add(a, b):\n    return a + b\n```" for code in attacks],
    ]
    extra = {}
    scores = reward(
        completions=completions,
        test_code=[TESTS] * len(completions),
        log_extra=extra.__setitem__,
    )
    listener.close()
    # The sandbox uid comes from the rendered TRAINYARD_SANDBOX_UIDS range (the tests
    # assert it), the network and the filesystem outside the sandbox are out of reach.
    # The example scores its tests by count: the wrong add fails 1 assert of errorScale 3
    # (0.2 + 0.8 x 2/3); the attacks fail at import, which earns nothing of the tests.
    assert scores == [1.0, pytest.approx(0.733333), 0.2, 0.2], extra
    assert not outside.exists()
    stages = extra["passes-tests/stages"]
    assert [[s["name"], s["passed"], s["errors"]] for s in stages[1]] == [
        ["compile", True, None],
        ["tests", False, 1],
    ]
    assert "FAIL line 2: AssertionError" in stages[1][1]["reason"]
    assert [s["errors"] for s in stages[2]] == [None, 0], "refused connection: setup failed"


def test_missing_program_is_refused_by_the_service_at_bind_time(sandbox_service, monkeypatch):
    monkeypatch.setenv(SANDBOX_URL_ENV, sandbox_service.url)
    stages = [{"name": "build", "command": ["ocamlfind-missing", "{file}"]}]
    with pytest.raises(ValueError, match="in the sandbox service .*ocamlfind-missing.*not found"):
        service_reward({"stages": stages})


def test_count_scored_stage_through_the_service(sandbox_service, monkeypatch):
    monkeypatch.setenv(SANDBOX_URL_ENV, sandbox_service.url)
    # Like dune/ocamlc: each error on a line of its own starting with "Error".
    report = "import sys\nsys.stderr.write('Error: a\\nError: b\\n')\nsys.exit(1)\n"
    stages = [
        {
            "name": "build",
            "command": ["{python}", "{file}"],
            "errorPattern": "^Error",
            "errorScale": 4,
        }
    ]
    reward = service_reward({"stages": stages, "testField": None, "testFileName": None})
    assert reward(completions=[report, "print('fine')"]) == [0.5, 1.0]


def test_unreachable_service_is_an_error_not_a_zero_score(monkeypatch):
    monkeypatch.setenv(SANDBOX_URL_ENV, f"http://127.0.0.1:{free_port()}")
    from trainyard.workloads.rewards import code_execution

    started = time.monotonic()
    with pytest.raises(SandboxUnavailable, match="unreachable after 2 tries"):
        code_execution._request(os.environ[SANDBOX_URL_ENV] + "/healthz", None, 5, attempts=2)
    assert time.monotonic() - started < 30


@pytest.mark.parametrize("runtime", ["namespaces", "gvisor"])
def test_trainyard_sandbox_prints_manifests_the_kubernetes_schema_accepts(runtime, capsys):
    """What the platform team applies: `trainyard sandbox | kubectl apply -f -`."""
    import kubernetes_validate

    from trainyard.cli.main import main

    assert main(["sandbox", "--runtime", runtime, "--image", "registry/trainer:1"]) == 0
    printed = capsys.readouterr().out
    assert "&id" not in printed, "plain YAML, no anchors shared between objects"
    manifests = list(yaml.safe_load_all(printed))
    assert [m["kind"] for m in manifests] == ["Namespace", "Deployment", "Service", "NetworkPolicy"]
    assert manifests == sandbox.render_sandbox_service(image="registry/trainer:1", runtime=runtime)
    for manifest in manifests:
        for version in ("1.33", kubernetes_validate.latest_version()):
            kubernetes_validate.validate(manifest, version, strict=True)


def test_validate_says_which_isolation_each_code_reward_will_have(tmp_path):
    import io

    from trainyard.cli.validate import validate_command

    document = example_run()
    strict = copy.deepcopy(document)
    strict["metadata"]["name"] = "code-grpo-strict"
    strict["spec"]["grpo"]["rewards"][0]["args"]["isolation"] = "strict"
    path = tmp_path / "runs.yaml"
    path.write_text(yaml.safe_dump_all([document, strict]))
    out = io.StringIO()
    assert validate_command([str(path)], out) == 0
    lines = out.getvalue().splitlines()
    assert (
        "reward 'passes-tests': isolation service: strict jail in the sandbox service at "
        in (lines[1])
    )
    assert "trainyard-sandbox.trainyard-sandbox.svc:8750" in lines[1]
    assert "isolation strict" in lines[3] and "the operator refuses it" in lines[3]


def test_the_runs_valid_condition_says_which_isolation_its_code_rewards_have():
    from datetime import UTC, datetime

    from trainyard.operator.reconcile import Observed, reconcile
    from trainyard.operator.status import find_condition

    document = example_run()
    document["metadata"].update(uid="uid-1", generation=1, namespace="team")
    plan = reconcile(
        Observed(run=document, children=[], pods=[], metrics=None, now=datetime.now(UTC))
    )
    valid = find_condition(plan.status["conditions"], "Valid")
    assert valid["status"] == "True"
    assert valid["message"].startswith("the spec is valid; reward 'passes-tests' runs programs ")
    assert "isolation service: strict jail in the sandbox service at http://" in valid["message"]


def post(url: str, body: object) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_the_protocol_refuses_bad_requests_and_keeps_serving(sandbox_service):
    from dataclasses import replace

    from trainyard.workloads.rewards.code_execution import ProgramJob, Stage, job_to_json
    from trainyard.workloads.rewards.sandbox import SandboxLimits

    url = sandbox_service.url
    job = ProgramJob(
        code="print('hi')",
        tests=None,
        stages=(Stage("run", ("{python}", "{file}")),),
        file_name="main.py",
        test_file_name=None,
        stop_on_failure=True,
        python="",
        limits=SandboxLimits(timeout_seconds=5),
        isolation="strict",
    )
    status, answer = post(url + "/v1/score", {"jobs": [{"code": "x"}]})
    assert status == 400 and "bad request" in answer["error"]
    greedy = replace(job, limits=SandboxLimits(timeout_seconds=10_000))
    status, answer = post(url + "/v1/score", {"jobs": [job_to_json(greedy)]})
    assert status == 400 and "above 600" in answer["error"]
    status, answer = post(url + "/v1/nothing", {})
    assert status == 404
    status, answer = post(url + "/v1/score", {"jobs": [job_to_json(job)]})
    assert status == 200 and answer["scores"][0]["stages"][0]["passed"] is True


def test_a_local_server_that_cannot_start_says_what_to_do(monkeypatch):
    """`trainyard run` starts a sandbox server here; where it cannot isolate (here: an
    unusable uid range), binding the reward fails with the server's reason and the ways out."""
    from trainyard.workloads.rewards import code_execution

    code_execution._stop_local_server()
    monkeypatch.delenv(SANDBOX_URL_ENV, raising=False)
    monkeypatch.setenv("TRAINYARD_SANDBOX_UIDS", "not-a-range")
    with pytest.raises(SandboxUnavailable) as raised:
        service_reward()
    message = str(raised.value)
    assert "TRAINYARD_SANDBOX_UIDS='not-a-range': expected FIRST-LAST" in message
    assert "isolation=rlimits" in message and SANDBOX_URL_ENV in message


def test_a_strict_code_reward_is_invalid_on_a_cluster_saying_what_to_use():
    """Trainer pods are restricted, so strict would fail in the pod after the image pull:
    the run is Invalid at once, naming the field and the two isolations that work there."""
    from datetime import UTC, datetime

    from trainyard.operator.reconcile import Observed, reconcile
    from trainyard.operator.status import find_condition

    document = example_run()
    document["metadata"].update(uid="uid-1", generation=1, namespace="team")
    document["spec"]["grpo"]["rewards"][0]["args"]["isolation"] = "strict"
    plan = reconcile(
        Observed(run=document, children=[], pods=[], metrics=None, now=datetime.now(UTC))
    )
    valid = find_condition(plan.status["conditions"], "Valid")
    assert valid["status"] == "False" and not plan.creates
    assert valid["message"].startswith("spec.grpo.rewards[0].args.isolation: strict needs root")
    assert "isolation: service" in valid["message"] and "rlimits" in valid["message"]


def test_two_code_rewards_must_share_one_sandbox_service():
    from trainyard.operator.builders import UnrenderableRun

    document = example_run()
    second = copy.deepcopy(document["spec"]["grpo"]["rewards"][0])
    second["name"] = "passes-tests-elsewhere"
    second["args"]["serviceUrl"] = "http://other-sandbox.tools.svc:8750"
    document["spec"]["grpo"]["rewards"].append(second)
    with pytest.raises(UnrenderableRun, match=r"rewards\[2\].args.serviceUrl: http://other"):
        trainer_pod(document)
    second["args"]["serviceUrl"] = "http://trainyard-sandbox.trainyard-sandbox.svc:8750"
    assert pss_violations(trainer_pod(document), "restricted") == []
