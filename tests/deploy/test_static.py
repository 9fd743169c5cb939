"""Static checks of the deployment files: Dockerfile lint and shape, compose and Kubernetes schema
validation, the Prometheus config, Grafana provisioning and the dashboard's structure.

No Docker engine is needed: compose files are validated by Debian's docker-compose, manifests by
kubernetes-validate's bundled schemas, the scrape config by promtool (deploy/ci-deps.sh installs
the Debian tools). The image itself is never built here.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILE = ROOT / "Dockerfile"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "offramp.json"
COMPOSE = DEPLOY / "docker-compose.yml"
COMPOSE_CPU = DEPLOY / "docker-compose.cpu.yml"

# The server's metrics as specified for server/metrics.py (all labelled model_name).
GAUGES = {"offramp_num_requests_running", "offramp_num_requests_waiting", "offramp_kv_cache_usage_ratio"}
COUNTERS = {
    "offramp_prompt_tokens_total", "offramp_generation_tokens_total", "offramp_request_success_total",
    "offramp_num_preemptions_total", "offramp_exit_tokens_total", "offramp_decode_flops_total",
    "offramp_decode_flops_full_depth_total",
}
HISTOGRAMS = {
    "offramp_time_to_first_token_seconds", "offramp_inter_token_latency_seconds",
    "offramp_e2e_request_latency_seconds", "offramp_request_queue_time_seconds",
    "offramp_decode_step_seconds", "offramp_exit_margin",
}
EXPOSED = GAUGES | COUNTERS | {h + s for h in HISTOGRAMS for s in ("_bucket", "_sum", "_count")}
ROWS = ["Early exit", "Latency", "Throughput", "Load"]


def tool(name: str) -> str:
    """Path of a command-line tool: the virtualenv's first (PyPI tools), then PATH (Debian's)."""
    path = shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if path is None:
        pytest.skip(f"{name} is not installed (deploy/ci-deps.sh installs the Debian tools)")
    return path


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)


def instructions(path: Path) -> list[tuple[str, str]]:
    """Dockerfile instructions as (KEYWORD, arguments), continuation lines joined, comments dropped."""
    result, pending = [], ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, rest = pending.strip().partition(" ")
        result.append((keyword.upper(), " ".join(rest.split())))
        pending = ""
    return result


def final_stage(path: Path) -> list[tuple[str, str]]:
    steps = instructions(path)
    last_from = max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM")
    return steps[last_from:]


def compose_config(*files: Path) -> dict:
    """The merged, normalised compose model as docker-compose itself resolves it."""
    args = [a for f in files for a in ("-f", str(f))]
    proc = run(tool("docker-compose"), *args, "config")
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)


def manifests() -> dict[str, dict]:
    docs = [d for f in sorted((DEPLOY / "k8s").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    return {d["kind"]: d for d in docs}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(board: dict) -> list[dict]:
    """Top-level panels plus those nested in collapsed rows."""
    return [p for top in board["panels"] for p in [top, *top.get("panels", [])]]


def exprs(board: dict) -> list[str]:
    return [t["expr"] for p in all_panels(board) for t in p.get("targets", [])]


def datasource_refs(node) -> list:
    """Every value of a "datasource" key anywhere in the dashboard JSON."""
    if isinstance(node, dict):
        own = [node["datasource"]] if "datasource" in node else []
        return own + [r for v in node.values() for r in datasource_refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in datasource_refs(v)]
    return []


def provisioned_datasource() -> dict:
    config = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = config["datasources"]
    return source


def cli_flags(args: list[str]) -> set[str]:
    return {a for a in args if a.startswith("--")}


def test_hadolint_passes():
    proc = run(tool("hadolint"), "--no-color", str(DOCKERFILE))
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def test_hadolint_ignores_are_justified():
    assert not list(ROOT.glob(".hadolint.y*ml")), "rules ignored globally cannot carry a justification"
    lines = DOCKERFILE.read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore=" in line:
            reason = lines[i - 1].strip() if i else ""
            assert reason.startswith("#") and "hadolint" not in reason and len(reason) > 20, (
                f"Dockerfile line {i + 1}: '{line.strip()}' needs a comment above it saying why")


def test_dockerfile_shape():
    steps = instructions(DOCKERFILE)
    froms = [args for keyword, args in steps if keyword == "FROM"]
    assert len(froms) >= 2, "multi-stage: build-only layers stay out of the final image"
    base = next(args for keyword, args in steps if keyword == "ARG" and args.startswith("BASE_IMAGE="))
    assert "cuda" in base and "pytorch" in base
    assert any("offramp fetch" in args for keyword, args in steps if keyword == "RUN")

    final = final_stage(DOCKERFILE)
    runs = " ".join(args for keyword, args in final if keyword == "RUN")
    assert re.search(r"\bgcc\b", runs), "Triton needs a C compiler in the running image"
    assert "/models" in runs
    envs = " ".join(args for keyword, args in final if keyword == "ENV")
    assert "OFFRAMP_HOME=" in envs
    (user,) = [args for keyword, args in final if keyword == "USER"]
    assert user.split(":")[0] not in ("root", "0")
    assert [args for keyword, args in final if keyword == "EXPOSE"] == ["8000"]
    (health,) = [args for keyword, args in final if keyword == "HEALTHCHECK"]
    assert "/health" in health and "--start-period=" in health
    (entrypoint,) = [args for keyword, args in final if keyword == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["offramp", "serve"]
    (cmd,) = [args for keyword, args in final if keyword == "CMD"]
    assert {"--host", "--port"} <= cli_flags(json.loads(cmd))


def test_dockerignore_keeps_the_build_inputs():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "tests"} <= ignored
    for needed in ("pyproject.toml", "README.md", "server", "kernels", "calibration", "bench"):
        assert needed not in ignored, f"{needed} is needed by `pip wheel .`"


def test_compose_files_validate():
    docker_compose = tool("docker-compose")
    for files in ([COMPOSE], [COMPOSE, COMPOSE_CPU]):
        args = [a for f in files for a in ("-f", str(f))]
        proc = run(docker_compose, *args, "config", "-q")
        assert proc.returncode == 0, proc.stderr


def test_compose_gpu_stack():
    services = compose_config(COMPOSE)["services"]
    assert set(services) == {"offramp", "prometheus", "grafana"}
    offramp = services["offramp"]
    (device,) = offramp["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and device["driver"] == "nvidia"
    assert offramp["ipc"] == "host"
    assert "/health" in " ".join(offramp["healthcheck"]["test"])
    assert [(p["published"], p["target"]) for p in offramp["ports"]] == [(8000, 8000)]
    assert any(v.split(":")[1] == "/models" for v in offramp["volumes"])
    assert "profiles" not in offramp, "a plain `up` must start the server"

    prometheus = services["prometheus"]
    assert f"{DEPLOY / 'prometheus.yml'}:/etc/prometheus/prometheus.yml:ro" in prometheus["volumes"]

    grafana = services["grafana"]
    env = grafana["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true" and env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert [(p["published"], p["target"]) for p in grafana["ports"]] == [(3000, 3000)]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"])
    assert mounts[str(DEPLOY / "grafana" / "provisioning")] == "/etc/grafana/provisioning"
    dashboards_dir = mounts[str(DEPLOY / "grafana" / "dashboards")]
    provider = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "offramp.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == dashboards_dir
    assert env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == f"{dashboards_dir}/{DASHBOARD.name}"


def test_compose_cpu_variant():
    services = compose_config(COMPOSE, COMPOSE_CPU)["services"]
    assert services["offramp"]["profiles"] == ["gpu"], "the GPU service must not start by default"
    cpu = services["offramp-cpu"]
    assert "deploy" not in cpu and "profiles" not in cpu
    assert "offramp" in cpu["networks"]["default"]["aliases"], "prometheus.yml scrapes offramp:8000"
    assert cpu["command"] == services["offramp"]["command"]
    assert cpu["healthcheck"] == services["offramp"]["healthcheck"]


def test_prometheus_config():
    proc = run(tool("promtool"), "check", "config", str(DEPLOY / "prometheus.yml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    assert config["global"]["scrape_interval"] == "5s"
    (job,) = config["scrape_configs"]
    assert job["static_configs"][0]["targets"] == ["offramp:8000"]
    assert provisioned_datasource()["jsonData"]["timeInterval"] == config["global"]["scrape_interval"]


def test_k8s_manifests_validate():
    files = sorted(str(f) for f in (DEPLOY / "k8s").glob("*.yaml"))
    proc = run(tool("kubernetes-validate"), "--strict", *files)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("passed") == len(files)


def test_k8s_deployment_and_service():
    objects = manifests()
    assert set(objects) == {"Deployment", "Service"}
    pod = objects["Deployment"]["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    (port,) = container["ports"]
    assert port["containerPort"] == 8000
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": port["name"]}
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port["containerPort"])
    assert annotations["prometheus.io/path"] == "/metrics"
    assert container["args"][container["args"].index("--host") + 1] == "0.0.0.0"

    service = objects["Service"]["spec"]
    assert service["selector"].items() <= pod["metadata"]["labels"].items()
    assert service["ports"][0]["targetPort"] == port["name"]


def test_dashboard_structure():
    board = dashboard()
    panels = all_panels(board)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert [p["title"] for p in panels if p["type"] == "row"] == ROWS

    uid = provisioned_datasource()["uid"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["datasource"]["current"]["value"] == uid
    for ref in datasource_refs(board):
        assert ref["type"] == "prometheus" and ref["uid"] in (uid, "${datasource}"), ref
    assert "model_name" in variables["model_name"]["definition"]

    for panel in panels:
        if panel["type"] != "row":
            assert panel["targets"] and panel["description"], panel["title"]
    for expr in exprs(board):
        for selector in re.findall(r"offramp_\w+\{([^}]*)\}", expr):
            assert 'model_name="$model_name"' in selector, expr


def test_dashboard_metrics_are_the_servers():
    used = {name for expr in exprs(dashboard()) for name in re.findall(r"\bofframp_\w+", expr)}
    assert used <= EXPOSED, f"not exposed by the server: {sorted(used - EXPOSED)}"
    families = {re.sub(r"_(bucket|count|sum)$", "", name) if name not in COUNTERS else name for name in used}
    specified = GAUGES | COUNTERS | HISTOGRAMS
    assert families == specified, f"no panel for {sorted(specified - families)}"


def test_readme_explains_every_panel():
    readme = (DEPLOY / "README.md").read_text()
    for panel in all_panels(dashboard()):
        assert panel["title"] in readme, f"deploy/README.md does not explain panel '{panel['title']}'"
    for fact in ("/models", "no Docker engine", "kubectl apply -f deploy/k8s/"):
        assert fact in readme


def test_ci_deps_script_parses():
    assert subprocess.run(["bash", "-n", str(DEPLOY / "ci-deps.sh")]).returncode == 0


def test_entrypoint_command_works():
    """`offramp serve` and `offramp fetch`, as the image runs them, accept every flag we pass them."""
    offramp = Path(sys.executable).with_name("offramp")
    assert offramp.exists(), "the offramp console script is not installed"
    final = final_stage(DOCKERFILE)
    (cmd,) = [json.loads(args) for keyword, args in final if keyword == "CMD"]
    compose = yaml.safe_load(COMPOSE.read_text())["services"]["offramp"]["command"]
    k8s = manifests()["Deployment"]["spec"]["template"]["spec"]["containers"][0]["args"]
    serve_flags = cli_flags(cmd) | cli_flags(compose) | cli_flags(k8s)
    fetch_flags = set()
    for keyword, args in instructions(DOCKERFILE):
        if keyword == "RUN" and "offramp fetch" in args:
            fetch_flags |= cli_flags(args.split("offramp fetch", 1)[1].split("&&")[0].split())
    assert fetch_flags, "the Dockerfile fetches the default model by name"

    for command, flags in ((["serve"], serve_flags), (["fetch"], fetch_flags)):
        proc = subprocess.run([str(offramp), *command, "--help"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"offramp {command[0]} --help failed:\n{proc.stderr[-2000:]}"
        missing = sorted(f for f in flags if f not in proc.stdout)
        assert not missing, f"offramp {command[0]} --help lists none of {missing}"
