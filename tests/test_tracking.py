"""MLflow tracking with a real backend (sqlite, and an `mlflow server` started here) and
tools/compare_runs.py on real runs."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import local_command, run_local, worker_of_rank
from PIL import Image

from lsa_dist.config import RunConfig
from lsa_dist.record import MARK_NAME, append_record, read_record
from lsa_dist.redact import REDACTED, redact_params, redact_text
from lsa_dist.sinks import Console, MetricsFile, Sinks
from lsa_dist.tracking import PENDING, Tracker, prepare

ROOT = Path(__file__).resolve().parents[1]


def train(
    tmp: Path, name: str, data: Path, uri: str, *overrides: str, nproc: int = 2, env: dict | None = None
) -> subprocess.CompletedProcess:
    return run_local(tmp, name, data, f"tracking.uri={uri}", *overrides, nproc=nproc, env=env, timeout=600)


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(uri)


def compare_runs(*args: str) -> subprocess.CompletedProcess:
    """tools/compare_runs.py with `args`, as a user runs it."""
    cmd = [sys.executable, str(ROOT / "tools" / "compare_runs.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def runs_named(uri: str, name: str) -> list:
    c = client(uri)
    experiment = c.get_experiment_by_name("lsa_demo")
    return c.search_runs([experiment.experiment_id], filter_string=f"attributes.run_name = '{name}'")


@pytest.mark.slow
def test_two_process_run_logs_one_run_from_rank_0_and_resume_continues_it(demo_shards: Path, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = dict(os.environ, LSA_TEST_SECRET_TOKEN="hunter2")
    proc = train(
        tmp_path,
        "tracked",
        demo_shards,
        uri,
        "train.max_steps=10",
        "tracking.system_metrics_interval_s=1",
        "tracking.attention_maps=2",
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = runs_named(uri, "tracked")
    params = run.data.params
    assert (
        params["optim.lr"] == "0.002"
        and params["engine.zero_stage"] == "2"
        and params["model.name"] == "lsa_cifar_tiny"
    )
    assert run.data.tags["sys.world_size"] == "2" and run.data.tags["sys.git_commit"]
    assert len(run.data.tags["sys.dataset_json_sha256"]) == 64
    assert "hunter2" not in str(params) + str(run.data.tags)  # no environment is logged
    history = client(uri).get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, 11))  # rank 0 only: one value per step
    assert "val/top1" in run.data.metrics and "train/mfu" in run.data.metrics
    artifacts = {a.path for a in client(uri).list_artifacts(run.info.run_id)}
    assert {"config.yaml", "model.pt", "final_metrics.txt"} <= artifacts
    # MLflow's system metrics of the one node, on by default (sampled every second here)
    system = {k for k in run.data.metrics if k.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system, system
    samples = len(client(uri).get_metric_history(run.info.run_id, "system/cpu_utilization_percentage"))
    assert attention_pictures(uri, run.info.run_id) == ["attention/step_00000010.png"]

    proc = train(
        tmp_path,
        "tracked",
        demo_shards,
        uri,
        "train.max_steps=20",
        "tracking.system_metrics=false",
        "tracking.attention_maps=2",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (again,) = runs_named(uri, "tracked")
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    history = client(uri).get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, 21))
    # turned off: the resumed attempt sent none
    assert len(client(uri).get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")) == samples
    # one attention picture per evaluation, at its step, from the same two validation images
    evaluations = sorted(m.step for m in client(uri).get_metric_history(run.info.run_id, "val/top1"))
    assert evaluations == [10, 20]
    pictures = attention_pictures(uri, run.info.run_id)
    assert pictures == [f"attention/step_{step:08d}.png" for step in evaluations]
    for picture in pictures:
        local = client(uri).download_artifacts(run.info.run_id, picture, str(tmp_path / "downloaded"))
        with Image.open(local) as image:
            assert image.format == "PNG" and image.width > 400 and image.height > 200
    kept = sorted(p.name for p in (tmp_path / "tracked" / "attention").iterdir())
    assert kept == [Path(p).name for p in pictures]


def attention_pictures(uri: str, run_id: str) -> list[str]:
    return sorted(a.path for a in client(uri).list_artifacts(run_id, "attention"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(folder: Path, port: int) -> subprocess.Popen:
    """A real `mlflow server` on 127.0.0.1:`port`, with its own sqlite backend and artifact folder."""
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{folder / 'server.db'}"]
    cmd += ["--artifacts-destination", str(folder / "server-artifacts")]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except OSError:
            time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail("mlflow server did not start")


def wait_for(condition, what: str, timeout: float = 120) -> None:  # noqa: ANN001
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, what
        time.sleep(0.5)


@pytest.mark.slow
def test_a_server_down_at_launch_and_mid_run_loses_nothing(demo_shards: Path, tmp_path: Path) -> None:
    """A real `mlflow server`, down at launch: training starts at once (one attempt, no retries)
    and the run is created when the server comes up, with the params, tags, artifacts and metrics
    held back; the server then dies mid-run (one warning, the mark stands still in metrics.jsonl)
    and comes back (the lines after the mark sent once); the checkpoint records the run and a
    relaunch continues it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    run_dir = tmp_path / "late"
    metrics = run_dir / "metrics.jsonl"
    epochs = "optim.epochs=60"
    cmd = local_command(tmp_path, "late", demo_shards, f"tracking.uri={url}", epochs)
    training = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    server = None
    try:
        wait_for(lambda: metrics.exists() and metrics.read_text().count('"train/loss"') >= 3, "no training", 300)
        server = start_mlflow_server(tmp_path, port)
        logged_while_down = metrics.stat().st_size

        def delivered() -> bool:  # the run, its config artifact and the metrics logged before it existed
            found = client(url).get_experiment_by_name("lsa_demo") and runs_named(url, "late")
            artifacts = {a.path for a in client(url).list_artifacts(found[0].info.run_id)} if found else set()
            return "config.yaml" in artifacts and sent_to(run_dir, found[0].info.run_id) >= logged_while_down

        wait_for(delivered, "the run was never created")
        os.killpg(server.pid, signal.SIGKILL)  # down mid-run
        server.wait()
        rank0 = run_dir / "logs" / "rank0.log"
        wait_for(lambda: "is unreachable" in rank0.read_text(), "the outage went unnoticed")
        stalled = sent_to(run_dir)
        wait_for(lambda: metrics.read_bytes()[stalled:].count(b'"train/loss"') >= 3, "no training in the outage")
        assert sent_to(run_dir) == stalled  # nothing is marked sent while the server is down
        server = start_mlflow_server(tmp_path, port)  # back, with its database
        logged_while_down = metrics.stat().st_size
        wait_for(lambda: sent_to(run_dir) >= logged_while_down, "the outage's metrics were not sent")
        training.send_signal(signal.SIGINT)  # a stop: checkpoint, exit 3
        out, err = training.communicate(timeout=300)
        assert training.returncode == 3, err[-3000:]
        assert (out + err).count("is unreachable") == 2 and (out + err).count("is back: run") == 1  # once per outage
        (run,) = runs_named(url, "late")
        assert run.info.status == "KILLED"
        assert run.data.params["optim.lr"] == "0.002" and run.data.tags["sys.world_size"] == "2"
        assert "config.yaml" in {a.path for a in client(url).list_artifacts(run.info.run_id)}
        logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if '"train/loss"' in line]
        history = sorted(m.step for m in client(url).get_metric_history(run.info.run_id, "train/loss"))
        assert history == sorted(logged) and history[0] == 1  # before, between and after the outages
        latest = json.loads(
            (run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text() / "meta.json").read_text()
        )
        assert latest["run_id"] == run.info.run_id

        again = train(tmp_path, "late", demo_shards, url, epochs, f"train.max_steps={max(logged) + 3}")
        assert again.returncode == 0, again.stderr[-3000:]
        (run,) = runs_named(url, "late")
        assert run.info.status == "FINISHED"
        history = sorted(m.step for m in client(url).get_metric_history(run.info.run_id, "train/loss"))
        assert history[-1] == max(logged) + 3
    finally:
        if training.poll() is None:
            training.kill()
        if server is not None and server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def sent_to(run_dir: Path, run_id: str = "") -> int:
    """How many bytes of run_dir/metrics.jsonl the mark says MLflow has (for `run_id`, if given)."""
    try:
        mark = json.loads((run_dir / MARK_NAME).read_text())
    except (OSError, ValueError):
        return -1
    return mark["offset"] if mark["run_id"] == (run_id or mark["run_id"]) else -1


def test_secrets_are_redacted_from_text_and_params() -> None:
    signed = "https://b.s3.amazonaws.com/wds/{shard}?X-Amz-Credential=AKIA%2F1&X-Amz-Signature=ab12&X-Amz-Expires=60"
    assert redact_text(signed) == (
        "https://b.s3.amazonaws.com/wds/{shard}?X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Expires=60"
    )
    assert redact_text("http://alice:pw@host:5000/x and https://ghp_tok@git.example/r") == (
        "http://***@host:5000/x and https://***@git.example/r"
    )
    assert redact_text("https://acct.blob.core.windows.net/c/{shard}?sv=2021&sig=A%3D&se=2026") == (
        "https://acct.blob.core.windows.net/c/{shard}?sv=2021&sig=***&se=2026"
    )
    assert redact_text("pipe:AWS_SECRET_ACCESS_KEY=xyz aws s3 cp s3://b/{shard} -") == (
        "pipe:AWS_SECRET_ACCESS_KEY=*** aws s3 cp s3://b/{shard} -"
    )
    for harmless in ("pipe:aws s3 cp s3://bucket/imagenet/{shard} -", "sqlite:////tmp/mlflow.db", "/data/shards"):
        assert redact_text(harmless) == harmless
    params = {"tracking.api_key": "abc", "db.password": "p", "tracking.uri": "http://u:p@h", "optim.lr": 0.1}
    assert redact_params(params) == {
        "tracking.api_key": REDACTED,
        "db.password": REDACTED,
        "tracking.uri": "http://***@h",
        "optim.lr": "0.1",
    }


def test_secret_headers_user_flags_and_password_pairs_are_redacted() -> None:
    """Credentials in a `pipe:curl` template's headers and -u flag, `name: value`, `name=value`
    and dict or JSON text in a string, and a URL password holding an @."""
    cases = {
        "pipe:curl -s -H 'Authorization: Bearer T0KEN' https://h/x-{000..009}.tar": (
            "pipe:curl -s -H 'Authorization: ***' https://h/x-{000..009}.tar"
        ),
        'pipe:curl -H "X-Api-Key: K3Y" -H "X-Auth-Token: T0KEN" https://h/{shard}': (
            'pipe:curl -H "X-Api-Key: ***" -H "X-Auth-Token: ***" https://h/{shard}'
        ),
        "pipe:curl -H 'Cookie: session=C00KIE' https://h/{shard}": "pipe:curl -H 'Cookie: ***' https://h/{shard}",
        "pipe:curl -u alice:PA55 https://h/{shard}": "pipe:curl -u *** https://h/{shard}",
        "pipe:curl --user alice:PA55 https://h/{shard}": "pipe:curl --user *** https://h/{shard}",
        "pipe:curl --user='alice:PA 55' https://h/{shard}": "pipe:curl --user='***' https://h/{shard}",
        "password: PA55": "password: ***",
        "password=PA55 user=alice": "password=*** user=alice",
        "{'password': 'PA55', 'user': 'alice'}": "{'password': '***', 'user': 'alice'}",
        '{"password": "PA55", "user": "alice"}': '{"password": "***", "user": "alice"}',
        "Authorization=Bearer T0KEN": "Authorization=*** ***",
        "http://user:p@ss@host:5000/x": "http://***@host:5000/x",
        "https://a:b@c@d@store.example/wds/{shard}?x=1": "https://***@store.example/wds/{shard}?x=1",
        # what OmegaConf said of such an override when it read it as a mapping
        '{"pipe:curl -H \'Authorization": "Bearer T0KEN\' https://h/x.tar"}': '{"pipe:curl -H \'Authorization": "***"}',
    }
    for text, shown in cases.items():
        assert redact_text(text) == shown, text


def test_secret_names_are_whole_words() -> None:
    """`author`, `monkey`, `tokens` or a traceback's KeyError are no secrets; api_key, access_key,
    token, auth_token, password and signed URLs' signature parameters are."""
    from lsa_dist.config import flatten
    from lsa_dist.redact import is_secret_name

    params = {"model.options.author": "Ada", "data.urls": "https://h/x?monkey=1&tokens=2", "x.api_key": "K"}
    assert redact_params(params) == {**params, "x.api_key": REDACTED}
    url = "https://h/x?monkey=1&api_key=A&access_key=B&token=C&auth_token=D&password=E&sig=F&X-Amz-Signature=G"
    assert redact_text(url) == (
        "https://h/x?monkey=1&api_key=***&access_key=***&token=***&auth_token=***&password=***&sig=***"
        "&X-Amz-Signature=***"
    )
    harmless = ["KeyError: 'optim.lr'", "tokens: 196", "author: Ada", "python -u -m submitit.core._submit /f"]
    harmless += ["overrides of the form key=value", "    def pick(flag: Any, key: str) -> Any:"]
    for text in harmless:
        assert redact_text(text) == text
    assert redact_text("https://maps.example/api?key=AIza00&v=3") == "https://maps.example/api?key=***&v=3"
    assert [k for k in flatten(RunConfig()) if any(is_secret_name(part) for part in k.split("."))] == []
    assert all(is_secret_name(n) for n in ("apiKey", "accessToken", "HF_TOKEN", "X-Amz-Credential", "Set-Cookie"))


def test_an_override_with_a_secret_header_is_a_string_and_no_error_shows_its_secret() -> None:
    """`data.urls=pipe:curl -H 'Authorization: Bearer ...' ...` holds `: `, which YAML reads as a
    mapping: the schema says str, so the text is kept as written. Error messages (a YAML
    mapping for a number, a bad value quoting a URL) are redacted where they are made."""
    from lsa_dist.config import ConfigError, load_config, redacted_yaml

    urls = "pipe:curl -s -H 'Authorization: Bearer T0KEN' https://h/x-{000..009}.tar"
    cfg = load_config(None, [f"data.urls={urls}", "launch.slurm.additional.comment=X-Api-Key: K3Y"])
    assert cfg.data.urls == urls and cfg.launch.slurm.additional == {"comment": "X-Api-Key: K3Y"}
    shown = redacted_yaml(cfg)
    assert "T0KEN" not in shown and "K3Y" not in shown and "Authorization: ***" in shown
    for override in ("optim.lr=Authorization: Bearer T0KEN", "train.resume=https://alice:T0KEN@h/ck"):
        with pytest.raises(ConfigError) as err:
            load_config(None, [f"data.urls={urls}", override])
        assert "T0KEN" not in str(err.value) and str(err.value).startswith(override.split("=")[0] + ": ")


def test_environment_values_are_redacted_from_params_and_the_config_artifact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keys whose values come from ${oc.env:...} (or interpolate such a key) are logged as ***,
    also when the workers read the resolved config back from the run folder."""
    from lsa_dist.config import load_config, redacted_yaml, to_yaml

    monkeypatch.setenv("LSA_TEST_TOKEN", "T0KEN")
    overrides = [
        "data.urls=pipe:curl -s https://h/${oc.env:LSA_TEST_TOKEN}/{shard}",
        "launch.slurm.setup=['export HF_TOKEN=${oc.env:LSA_TEST_TOKEN}']",
        "tracking.run_name=${data.urls}",
    ]
    cfg = load_config(ROOT / "configs" / "demo.yaml", overrides)
    assert cfg.data.urls == "pipe:curl -s https://h/T0KEN/{shard}"
    saved = tmp_path / "config.yaml"
    saved.write_text(to_yaml(cfg))
    logged: dict[str, str] = {}

    class Capture:  # what Tracker.log_config hands Tracker.log_params
        def log_params(self, params: dict, hidden: list[str] = ()) -> None:
            logged.update(redact_params(params, hidden))

    for loaded in (cfg, load_config(saved)):
        assert loaded.tracking.from_env == ["data.urls", "launch.slurm.setup", "tracking.run_name"]
        Tracker.log_config(Capture(), loaded)
        assert logged["data.urls"] == logged["launch.slurm.setup"] == logged["tracking.run_name"] == REDACTED
        assert logged["optim.lr"] == str(cfg.optim.lr) and not any("T0KEN" in v for v in logged.values())
        assert "T0KEN" not in redacted_yaml(loaded)


LIBRARY_OUTPUT = """
import logging, sys, traceback, warnings
library = logging.getLogger("some.library")
library.addHandler(logging.StreamHandler())  # configured at import, holding the raw sys.stderr
from lsa_dist.redact import redact_output
redact_output()
URL = "https://alice:PASSWORD@store.example/wds/a.tar?X-Amz-Signature=SIGNATURE"
library.warning("retrying %s", URL)
warnings.warn(f"slow read from {URL}")
print(f"opening {URL}")
try:
    raise ConnectionError(f"cannot reach {URL}")
except ConnectionError:
    traceback.print_exc()
raise OSError(f"gave up on {URL}")
"""


def test_what_libraries_print_loses_its_secrets() -> None:
    """Log records through handlers made before the filter, warnings, prints, tracebacks and
    the uncaught exception of a process that called redact_output."""
    out = subprocess.run([sys.executable, "-c", LIBRARY_OUTPUT], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    text = out.stdout + out.stderr
    assert "PASSWORD" not in text and "SIGNATURE" not in text, text
    expected = "https://***@store.example/wds/a.tar?X-Amz-Signature=***"
    assert out.stdout.count(expected) == 1 and out.stderr.count(expected) == 4, text


@pytest.mark.slow
def test_no_secret_reaches_mlflow_the_logs_or_the_console(demo_shards: Path, tmp_path: Path) -> None:
    """A run whose tracking URI carries a password and whose shards are read over HTTP with
    signed-URL parameters, and a run that fails reading such a URL: the secrets are in no
    MLflow param, tag, metric or artifact, no log and no console line; the run folder's
    configs keep them (a resume needs them), readable by their owner only."""
    secrets = ("S3CRETPASS", "S3CRETSIG", "S3CRETCRED")
    port, files = free_port(), free_port()
    server = start_mlflow_server(tmp_path, port)
    shards = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "http.server",
            str(files),
            "--bind",
            "127.0.0.1",
            "--directory",
            str(demo_shards / "wds"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        uri = f"http://alice:S3CRETPASS@127.0.0.1:{port}"
        query = "?X-Amz-Credential=S3CRETCRED&X-Amz-Signature=S3CRETSIG"
        wait_for(lambda: _answers(f"http://127.0.0.1:{files}/"), "the shard server")
        good = train(
            tmp_path,
            "signed",
            demo_shards,
            uri,
            f"data.urls=http://127.0.0.1:{files}/{{shard}}{query}",
            "train.max_steps=3",
            nproc=1,
        )
        assert good.returncode == 0, good.stdout[-2000:] + good.stderr[-3000:]
        bad = train(tmp_path, "broken", demo_shards, uri, f"data.urls=http://127.0.0.1:1/{{shard}}{query}", nproc=1)
        assert bad.returncode != 0 and "cannot read shard http://127.0.0.1:1/" in bad.stdout + bad.stderr
        (run,) = client(f"http://127.0.0.1:{port}").search_runs(
            [client(f"http://127.0.0.1:{port}").get_experiment_by_name("lsa_demo").experiment_id],
            filter_string="attributes.run_name = 'signed'",
        )
        assert (
            run.data.params["data.urls"]
            == f"http://127.0.0.1:{files}/{{shard}}?X-Amz-Credential=***&X-Amz-Signature=***"
        )
        assert run.data.params["tracking.uri"] == f"http://***@127.0.0.1:{port}"
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        shards.kill()
    real_configs = {
        p for p in tmp_path.rglob("*.yaml") if "mlflow" not in p.parts and "server-artifacts" not in p.parts
    }
    assert real_configs and all(p.stat().st_mode & 0o777 == 0o600 for p in real_configs)
    assert any("S3CRETSIG" in p.read_text() for p in real_configs)  # kept where a resume reads it
    shown = [p for p in tmp_path.rglob("*") if p.is_file() and p not in real_configs]
    assert any(p.name == "server.db" for p in shown) and any("server-artifacts" in p.parts for p in shown)
    leaks = [str(p) for p in shown for secret in secrets if secret.encode() in p.read_bytes()]
    for text in (good.stdout, good.stderr, bad.stdout, bad.stderr):
        leaks += [secret for secret in secrets if secret in text]
    assert not leaks, leaks


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2)
        return True
    except OSError:
        return False


def test_unreachable_backend_never_stops_training(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = RunConfig()
    cfg.tracking.uri = "http://127.0.0.1:9"  # nothing listens on the discard port
    import mlflow

    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    try:
        assert prepare(cfg) == PENDING
        assert "unreachable" in capsys.readouterr().err
        tracker = Tracker(cfg, "0" * 32, tmp_path / "metrics.jsonl", flush_every_s=0.1)
        tracker.log_metrics({"train/loss": 1.0}, step=1)
        tracker.finish()
    finally:
        os.environ.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES", None)
    assert (tmp_path / "metrics.jsonl").read_text().count("train/loss") == 1  # kept, to be sent later
    assert json.loads((tmp_path / MARK_NAME).read_text()) == {"run_id": "0" * 32, "offset": 0}
    del mlflow


@pytest.mark.slow
def test_compare_runs_on_real_runs(demo_shards: Path, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for lr in ("0.002", "0.0005"):
        proc = train(tmp_path, f"lr{lr}", demo_shards, uri, f"optim.lr={lr}", "train.max_steps=8", nproc=1)
        assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "compare"
    proc = compare_runs("--experiment", "lsa_demo", "--uri", uri, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    header = proc.stdout.splitlines()[0].split()
    assert "optim.lr" in header and "optim.epochs" not in header  # only params that differ
    assert all(f"lr{lr}" in proc.stdout for lr in ("0.002", "0.0005"))
    rows = list(csv.DictReader((out / "comparison.csv").open()))
    assert len(rows) == 2
    for row in rows:
        run = client(uri).get_run(row["run_id"])
        assert row["optim.lr"] == run.data.params["optim.lr"]
        assert float(row["val/top1 last"]) == pytest.approx(run.data.metrics["val/top1"])
        assert float(row["images/s"]) == pytest.approx(run.data.metrics["train/images_per_s"])
        assert row["status"] == "FINISHED"
    for png in ("curves.png", "val_top1_vs_optim.lr.png"):
        with Image.open(out / png) as image:
            assert image.width >= 600 and image.height >= 400
            colors = image.convert("RGB").getcolors(maxcolors=1 << 20)
            assert colors is not None and len(colors) > 50  # drawn, not blank
        assert (out / png).stat().st_size > 20_000


def test_compare_runs_with_hundreds_of_runs(tmp_path: Path) -> None:
    from mlflow.entities import Metric, Param

    uri = f"sqlite:///{tmp_path / 'many.db'}"
    c = client(uri)
    experiment = c.create_experiment("sweep", artifact_location=(tmp_path / "artifacts").as_uri())
    for i in range(300):
        run = c.create_run(experiment, run_name=f"run{i:03d}")
        params = [
            Param("optim.lr", str(1e-4 * (i % 10 + 1))),
            Param("model.name", "lsa_tiny"),
            Param("train.seed", str(i)),
        ]
        metrics = [
            Metric("val/top1", 50 + i / 10, 0, 1),
            Metric("val/top1_best", 60 + i / 10, 0, 1),
            Metric("train/images_per_s", 100.0, 0, 1),
        ]
        c.log_batch(run.info.run_id, metrics=metrics, params=params)
        c.set_terminated(run.info.run_id)
    proc = compare_runs("--experiment", "sweep", "--uri", uri, "--metric", "val/top1", "--out", str(tmp_path / "o"))
    assert proc.returncode == 0, proc.stderr
    assert "300 runs from" in proc.stdout
    rows = list(csv.DictReader((tmp_path / "o" / "comparison.csv").open()))
    assert len(rows) == 300 and "model.name" not in rows[0]  # the same everywhere: not shown
    best = max(rows, key=lambda r: float(r["val/top1 best"]))
    assert best["run"] == "run299" and float(best["val/top1 best"]) == pytest.approx(89.9)


def test_compare_runs_errors(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'empty.db'}"
    proc = compare_runs("--experiment", "nope", "--uri", uri)
    assert proc.returncode == 1 and "error: no experiment 'nope'" in proc.stderr


class Server:
    """An MLflow client that fails as an unreachable server does while `down`, and keeps the
    (run, key, step) of every metric it delivers."""

    def __init__(self, real: object) -> None:
        self.real, self.down, self.delivered = real, False, []

    def __getattr__(self, name: str):
        method = getattr(self.real, name)

        def call(*args, **kwargs):
            if self.down:
                raise ConnectionError("Connection refused")
            if name == "log_batch":
                self.delivered += [(args[0], m.key, m.step) for m in kwargs.get("metrics") or ()]
            return method(*args, **kwargs)

        return call


def test_metrics_reach_mlflow_once_from_metrics_jsonl_after_an_outage_and_in_a_later_process(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Rank 0's sinks write metrics.jsonl and feed the Tracker (flushed by hand here): metrics
    logged during an outage are sent once from the file when the server is back; a later
    process of the same run sends what the earlier one left unsent, once; a PENDING process
    opens the run and sends its lines; another MLflow run for the same folder gets nothing of
    the first one's unsent lines (a new lineage sets the record aside: the next test)."""
    cfg = RunConfig()
    cfg.tracking.uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    record = tmp_path / "run" / "metrics.jsonl"
    record.parent.mkdir()
    server = Server(None)

    def process(run_id: str, previous: str = "") -> tuple[Tracker, Sinks]:
        tracker = Tracker(cfg, run_id, record, flush_every_s=3600, previous=previous)
        server.real, tracker.client = tracker.client, server
        return tracker, Sinks(MetricsFile(record, True), tracker, Console(False, 1, 1))

    def log(sinks: Sinks, *steps: int) -> None:
        for step in steps:
            sinks.log({"train/loss": 1.0 / step, "train/lr": 0.1}, step)

    def history(run_id: str) -> list[int]:
        return sorted(m.step for m in client(cfg.tracking.uri).get_metric_history(run_id, "train/loss"))

    def delivered(run_id: str) -> list[int]:
        return [step for run, key, step in server.delivered if run == run_id and key == "train/loss"]

    first = prepare(cfg)
    tracker, sinks = process(first)
    log(sinks, 1, 2)
    tracker._flush()
    server.down = True
    log(sinks, 3, 4)
    tracker._flush()
    log(sinks, 5)
    tracker._flush()  # still down: the mark stays, no second warning
    assert record.read_text().count("train/loss") == 5 and sent_to(record.parent, first) < record.stat().st_size
    server.down = False
    log(sinks, 6)
    tracker._flush()
    assert delivered(first) == [1, 2, 3, 4, 5, 6] and sent_to(record.parent, first) == record.stat().st_size
    log(sinks, 7)
    server.down = True
    tracker.finish("KILLED")  # down at the end: step 7 is only in the file
    assert delivered(first) == [1, 2, 3, 4, 5, 6]
    assert capsys.readouterr().err.count("is unreachable") == 2  # once per outage

    server.down = False
    tracker, sinks = process(first)  # a later process of the same run (a resume, a requeue)
    log(sinks, 8)
    tracker.finish()
    assert delivered(first) == [1, 2, 3, 4, 5, 6, 7, 8] and history(first) == list(range(1, 9))
    assert json.loads((record.parent / MARK_NAME).read_text()) == {"run_id": first, "offset": record.stat().st_size}
    assert client(cfg.tracking.uri).get_run(first).info.status == "FINISHED"

    server.down = True
    tracker, sinks = process(first)
    log(sinks, 9)
    tracker.finish("KILLED")  # step 9 of the first run is left unsent
    server.down = False
    second = prepare(cfg)  # another MLflow run for the same folder (the first one was deleted, say)
    tracker, sinks = process(second)
    log(sinks, 10)
    tracker.finish()
    assert delivered(second) == [10] and delivered(first) == list(range(1, 9))
    assert f"metrics of MLflow run {first} that never reached it" in capsys.readouterr().err

    tracker, sinks = process(PENDING, previous=second)  # the server was down at launch
    log(sinks, 11)
    tracker.finish()
    assert f"is back: run {second}" in capsys.readouterr().err
    assert delivered(second) == [10, 11] and history(second) == [10, 11] and history(first) == list(range(1, 9))
    rows = [json.loads(line) for line in record.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 12))  # the file has everything, in order


def test_an_attempt_that_continues_an_ended_run_marks_it_running_again(tmp_path: Path) -> None:
    """A --max-restarts attempt continues a run its crashed predecessor ended FAILED, a requeued
    SLURM attempt one ended KILLED: each trains under RUNNING, and ends with its own status."""
    cfg = RunConfig()
    cfg.tracking.uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = prepare(cfg)
    for before in ("FAILED", "KILLED"):
        client(cfg.tracking.uri).set_terminated(run_id, status=before)
        tracker = Tracker(cfg, run_id, tmp_path / "metrics.jsonl", flush_every_s=3600)
        assert client(cfg.tracking.uri).get_run(run_id).info.status == "RUNNING", before
        tracker.finish("FINISHED")
        assert client(cfg.tracking.uri).get_run(run_id).info.status == "FINISHED"


def test_steps_a_restart_trains_again_are_recorded_and_sent_once(tmp_path: Path) -> None:
    """A restart resumes from the checkpoint at step 6 after step 10 was logged: steps 7-10
    are trained again (with the same numbers) but not logged again; 11 and 12 are."""
    cfg = RunConfig()
    cfg.tracking.uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    record = tmp_path / "metrics.jsonl"
    run_id = prepare(cfg)

    def attempt(steps: range) -> None:
        tracker = Tracker(cfg, run_id, record, flush_every_s=3600)
        sinks = Sinks(MetricsFile(record, True), tracker, Console(False, 1, 1))
        for step in steps:
            sinks.log({"train/loss": 1.0 / step}, step)
        tracker.finish("KILLED")

    attempt(range(1, 11))
    attempt(range(7, 13))
    lines = [json.loads(line)["step"] for line in record.read_text().splitlines()]
    assert lines == list(range(1, 13))
    history = client(cfg.tracking.uri).get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, 13))


def test_what_a_new_lineage_or_a_branch_leaves_takes_its_metrics_along(tmp_path: Path) -> None:
    """train.overwrite=true (a new lineage): the record and its MLflow mark go into set_aside/
    with the checkpoints, so nothing of the old lineage reaches the new run. A branch from the
    checkpoint at step 3: the lines after step 3 go aside, the mark still points at the same
    (kept) lines."""
    from lsa_dist.resume.plan import ResumePlan, set_record_aside

    run = tmp_path / "run"
    record = run / "metrics.jsonl"
    run.mkdir()
    for step in range(1, 7):
        append_record(record, {"train/loss": 1.0 / step}, step)
    mark = run / MARK_NAME
    sent = len("".join(record.read_text().splitlines(keepends=True)[:4]).encode())  # MLflow has steps 1-4
    mark.write_text(json.dumps({"run_id": "old", "offset": sent}))
    branch = run / "checkpoints" / "step-00000003"
    branch.mkdir(parents=True)
    (branch / "meta.json").write_text(json.dumps({"step": 3}))
    set_record_aside(ResumePlan(folder=branch, leave=[run / "checkpoints" / "step-00000006"]), run, run / "aside1")
    assert [json.loads(line)["step"] for line in record.read_text().splitlines()] == [1, 2, 3]
    assert [json.loads(line)["step"] for line in (run / "aside1" / "metrics.jsonl").read_text().splitlines()] == [
        4,
        5,
        6,
    ]
    assert json.loads(mark.read_text()) == {"run_id": "old", "offset": record.stat().st_size}
    (run / "aside2").mkdir()
    set_record_aside(ResumePlan(folder=None, leave=[branch]), run, run / "aside2")
    assert not record.exists() and not mark.exists()
    assert (run / "aside2" / "metrics.jsonl").is_file() and (run / "aside2" / MARK_NAME).is_file()


def test_the_record_is_read_by_whole_lines_in_pieces(tmp_path: Path) -> None:
    """The catch-up's reader: a line torn by a crash (then appended to) is passed over, a line
    still being written is left for later, a piece ends after about `limit` bytes."""
    record = tmp_path / "metrics.jsonl"
    first = append_record(record, {"train/loss": 2.0}, 1)
    with record.open("a") as f:
        f.write('{"step": 2, "ti')  # a crash mid-line; the next process appends after it
    append_record(record, {"train/loss": 1.5}, 3)
    last = append_record(record, {"train/loss": 1.0, "val/top1": 50.0}, 4)
    with record.open("a") as f:
        f.write('{"step": 5, "time"')
    rows, offset = read_record(record, 0)
    assert [(k, v, s) for k, v, _, s in rows] == [("train/loss", 2.0, 1), ("train/loss", 1.0, 4), ("val/top1", 50.0, 4)]
    assert offset == last.end < record.stat().st_size and rows[0][2] == int(first.time * 1000)
    assert read_record(record, 0, limit=1) == (rows[:1], first.end)
    assert read_record(record, last.end) == ([], last.end)


@pytest.mark.slow
def test_a_crashed_run_ends_failed_with_its_metrics(demo_shards: Path, tmp_path: Path) -> None:
    """A rank SIGKILLed mid-run (no restarts): the run is FAILED in MLflow, not RUNNING forever,
    and holds every step rank 0 logged before it went down (flushed on its way out)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = local_command(tmp_path, "crash", demo_shards, f"tracking.uri={uri}", "train.max_steps=300")
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "crash" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not metrics.exists() or metrics.read_text().count('"train/loss"') < 5):
        time.sleep(0.1)
    os.kill(worker_of_rank(tmp_path / "crash", 1), signal.SIGKILL)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 1 and "failed (signal 9)" in err, err[-3000:]
    (run,) = runs_named(uri, "crash")
    assert run.info.status == "FAILED"
    logged = {json.loads(line)["step"] for line in metrics.read_text().splitlines() if '"train/loss"' in line}
    history = {m.step for m in client(uri).get_metric_history(run.info.run_id, "train/loss")}
    assert history == logged and len(logged) >= 5


def test_compare_runs_takes_the_best_by_the_metrics_direction(tmp_path: Path) -> None:
    """A loss is best at its lowest point (not its last), top-1 at its highest; the curves plot
    draws the best runs; --mode overrides the direction."""
    from mlflow.entities import Metric

    uri = f"sqlite:///{tmp_path / 'dir.db'}"
    c = client(uri)
    experiment = c.create_experiment("dir", artifact_location=(tmp_path / "artifacts").as_uri())
    histories = {"low": [2.0, 0.5, 0.9], "middle": [2.0, 1.0, 0.8], "high": [2.0, 1.5, 1.4]}
    for name, values in histories.items():
        run = c.create_run(experiment, run_name=name)
        metrics = [Metric("val/loss", v, 0, step) for step, v in enumerate(values, 1)]
        c.log_batch(run.info.run_id, metrics=metrics)
        c.set_terminated(run.info.run_id)
    out = tmp_path / "o"
    args = ("--experiment", "dir", "--uri", uri, "--metric", "val/loss", "--plot-runs", "1", "--out", str(out))
    proc = compare_runs(*args)
    assert proc.returncode == 0, proc.stderr
    rows = {r["run"]: r for r in csv.DictReader((out / "comparison.csv").open())}
    assert {name: float(r["val/loss best"]) for name, r in rows.items()} == {"low": 0.5, "middle": 0.8, "high": 1.4}
    assert float(rows["low"]["val/loss last"]) == 0.9
    assert "best: val/loss lowest" in proc.stdout and "curves of the 1 best runs by val/loss best: low" in proc.stdout
    proc = compare_runs(*args, "--mode", "max")
    rows = {r["run"]: r for r in csv.DictReader((out / "comparison.csv").open())}
    assert float(rows["high"]["val/loss best"]) == 2.0 and "best: val/loss highest" in proc.stdout
