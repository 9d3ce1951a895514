"""``serve``: the plan (checks, on-the-fly conversion, bucket, command) without a server, then one real
``adaconvert serve`` on loopback with two converted adapters and one raw AdaLoRA, queried with the openai client
and stopped with Ctrl-C (SIGINT) at the end — or killed, with everything it spawned, if a test fails first.

The real server listens on 0.0.0.0 with an API key given through VLLM_API_KEY (as a user keeps it out of `ps`),
and is started from an environment that asks for vLLM's runtime adapter loading, which it must not get."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from adaconvert import to_lora
from adaconvert.cli import main
from adaconvert.compat.layout import is_safe_layout
from adaconvert.errors import InvalidConfigError, RankLimitError, ServeError, SourceNotFoundError
from adaconvert.serving.server import (
    ServePlan,
    VllmServer,
    check_port_free,
    engine_memory_args,
    is_loopback,
    plan_serve,
    serve,
)
from tests.helpers.adapter_edits import wrong_prefix
from tests.helpers.needs import require
from tests.helpers.vllm_utils import user_env


@pytest.fixture(scope="module")
def adapters(adalora_llama, adalora_llama_b, lora_variants, tmp_path_factory):
    """name → (what to serve, the original PEFT adapter it must behave like)."""
    root = tmp_path_factory.mktemp("serve-adapters")
    to_lora(adalora_llama, root / "ada-lora")
    to_lora(lora_variants["plain"], root / "plain-lora")
    return {
        "ada": (root / "ada-lora", adalora_llama),
        "plain": (root / "plain-lora", lora_variants["plain"]),
        "raw": (adalora_llama_b, adalora_llama_b),  # AdaLoRA as trained: converted on the fly
    }


def _served(adapters) -> dict:
    return {name: path for name, (path, _) in adapters.items()}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_plan_converts_what_needs_it_and_picks_the_smallest_bucket(tiny_llama, adapters, tmp_path):
    cache = tmp_path / "cache"
    plan = plan_serve(tiny_llama, _served(adapters), cache_dir=cache, port=8123, extra_args=["--dtype", "float32"])
    by_name = {a.name: a for a in plan.adapters}
    assert [a.name for a in plan.adapters] == ["ada", "plain", "raw"]
    assert not by_name["ada"].converted and by_name["ada"].path == str(adapters["ada"][0].resolve())
    assert by_name["raw"].converted and not by_name["raw"].cached and by_name["raw"].kind == "adalora"
    assert by_name["raw"].path.startswith(str(cache)) and is_safe_layout(by_name["raw"].path)
    assert plan.max_lora_rank == 8 and max(a.max_rank for a in plan.adapters) <= 8
    assert (plan.max_loras, plan.max_cpu_loras) == (3, 3)
    assert plan.command == [
        "vllm", "serve", str(tiny_llama.resolve()), "--host", "127.0.0.1", "--port", "8123", "--enable-lora",
        "--max-lora-rank", "8", "--max-loras", "3", "--max-cpu-loras", "3", "--lora-modules",
        f"ada={by_name['ada'].path}", f"plain={by_name['plain'].path}", f"raw={by_name['raw'].path}",
        "--dtype", "float32",
    ]  # fmt: skip
    again = plan_serve(tiny_llama, _served(adapters), cache_dir=cache, port=8123)
    assert {a.name: (a.path, a.cached) for a in again.adapters}["raw"] == (by_name["raw"].path, True)


def test_plan_respects_explicit_limits(tiny_llama, adapters, tmp_path):
    plan = plan_serve(
        tiny_llama, _served(adapters), cache_dir=tmp_path, max_lora_rank=64, max_loras=2, max_cpu_loras=5
    )
    assert (plan.max_lora_rank, plan.max_loras, plan.max_cpu_loras) == (64, 2, 5)


def test_print_command_prints_exactly_the_command(tiny_llama, adapters, tmp_path, capsys):
    argv = ["serve", str(tiny_llama), *(f"{n}={p}" for n, p in _served(adapters).items())]
    argv += ["--cache-dir", str(tmp_path), "--port", "9000", "--print-command", "-q", "--", "--dtype", "float32"]
    assert main(argv) == 0
    printed = capsys.readouterr().out.strip()
    plan = plan_serve(tiny_llama, _served(adapters), cache_dir=tmp_path, port=9000, extra_args=["--dtype", "float32"])
    assert printed == plan.shell_command()
    assert printed.startswith(f"vllm serve {tiny_llama.resolve()} --host 127.0.0.1 --port 9000 --enable-lora")
    assert printed.endswith(" --dtype float32")


def test_dry_run_checks_without_starting(tiny_llama, adapters, tmp_path, capsys):
    argv = ["serve", str(tiny_llama), f"ada={adapters['ada'][0]}", "--cache-dir", str(tmp_path), "--dry-run"]
    assert main([*argv, "--port", str(_free_port()), "-q"]) == 0
    out = capsys.readouterr().out
    assert "--max-lora-rank 8" in out and "vllm serve" in out


def _broken(adapters, tmp_path):
    return {"bad": wrong_prefix(adapters["ada"][0], tmp_path / "broken")}


PLAN_ERRORS = [
    (lambda a, t: {}, {}, InvalidConfigError, "at least one NAME=ADAPTER"),
    (lambda a, t: [("bad name", a["ada"][0])], {}, InvalidConfigError, "adapter name 'bad name'"),
    (lambda a, t: [("x", a["ada"][0]), ("x", a["plain"][0])], {}, InvalidConfigError, "'x' is given twice"),
    (lambda a, t: {"x": t / "nowhere"}, {}, SourceNotFoundError, "adapter 'x': no such directory"),
    (_broken, {}, InvalidConfigError, r"adapter 'bad': it would not load in vLLM: \[unknown-module\]"),
    (lambda a, t: _served(a), {"max_lora_rank": 1}, RankLimitError, "above --max-lora-rank 1; use 8"),
    (lambda a, t: _served(a), {"max_lora_rank": 24}, InvalidConfigError, "must be one of 1, 8, 16"),
    (lambda a, t: _served(a), {"max_loras": 4, "max_cpu_loras": 2}, InvalidConfigError, "--max-cpu-loras"),
    (lambda a, t: _served(a), {"extra_args": ["--max-lora-rank=8"]}, InvalidConfigError, "clashes"),
    (lambda a, t: _served(a), {"extra_args": ["--port", "1"]}, InvalidConfigError, "--port after `--` clashes"),
    (lambda a, t: _served(a), {"port": 0}, InvalidConfigError, "--port must be in"),
    (lambda a, t: _served(a), {"extra_args": ["--api-key", "k"]}, InvalidConfigError, "--api-key after `--` clashes"),
    (lambda a, t: _served(a), {"host": "0.0.0.0"}, InvalidConfigError, "--host 0.0.0.0 is reachable from other"),
    (lambda a, t: _served(a), {"host": "::"}, InvalidConfigError, "give an API key .* or pass --insecure"),
    (lambda a, t: _served(a), {"host": "myhost.example"}, InvalidConfigError, "reachable from other machines"),
    (lambda a, t: _served(a), {"host": "0.0.0.0", "api_key": ""}, InvalidConfigError, "API key is empty"),
]


@pytest.mark.parametrize(("named", "options", "error", "match"), PLAN_ERRORS)
def test_bad_adapters_and_options_fail_before_vllm_starts(
    named, options, error, match, tiny_llama, adapters, tmp_path
):
    with pytest.raises(error, match=match):
        serve(tiny_llama, named(adapters, tmp_path), cache_dir=tmp_path / "cache", **options)


def test_port_clash_is_detected_before_starting(tiny_llama, adapters, tmp_path, capsys):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(ServeError, match=f"cannot listen on 127.0.0.1:{port}"):
            serve(tiny_llama, {"ada": adapters["ada"][0]}, port=port, dry_run=True, cache_dir=tmp_path)
        plan = plan_serve(tiny_llama, {"ada": adapters["ada"][0]}, port=port, cache_dir=tmp_path)
        server = VllmServer(plan)
        with pytest.raises(ServeError, match="another server holds it"):
            server.start()
        assert server.process is None
        argv = [
            "serve",
            str(tiny_llama),
            f"ada={adapters['ada'][0]}",
            "--port",
            str(port),
            "--cache-dir",
            str(tmp_path),
        ]
        assert main([*argv, "-q"]) == 9
        assert capsys.readouterr().err.startswith(f"error: cannot listen on 127.0.0.1:{port}")


def test_plan_serialises(tiny_llama, adapters, tmp_path):
    plan = plan_serve(tiny_llama, {"ada": adapters["ada"][0]}, cache_dir=tmp_path)
    data = json.loads(json.dumps(plan.to_dict()))
    assert data["url"] == "http://127.0.0.1:8000" and data["shell_command"].startswith("vllm serve ")
    assert isinstance(plan, ServePlan)


# --- one real server, started through the CLI as a user would, stopped with Ctrl-C --------------------------------


@pytest.fixture(scope="module")
def server(tiny_llama, adapters, tmp_path_factory):
    """``adaconvert serve`` in a subprocess on loopback; yields (url, process, log path, vLLM's pids)."""
    psutil = require("psutil", purpose="the server tests")
    require("vllm", purpose="the vLLM tests")
    work = tmp_path_factory.mktemp("server")
    port = _free_port()
    argv = [sys.executable, "-m", "adaconvert.cli", "serve", str(tiny_llama)]
    argv += [f"{name}={path}" for name, path in _served(adapters).items()]
    argv += ["--host", "0.0.0.0", "--port", str(port)]
    argv += ["--cache-dir", str(work / "cache"), "--log-file", str(work / "vllm.log")]
    argv += ["--", "--dtype", "float32", "--enforce-eager", "--max-model-len", "128", "--max-num-seqs", "8"]
    out = open(work / "cli.log", "wb")  # noqa: SIM115 - closed below
    # a user's environment: no VLLM_* setting (serve sizes vLLM's CPU KV cache itself), but the key as a user keeps
    # it out of `ps`, and runtime adapter loading asked for, which vLLM must not get
    env = user_env(VLLM_API_KEY=KEY, VLLM_ALLOW_RUNTIME_LORA_UPDATING="1")
    cli = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    spawned: list = []
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if cli.poll() is not None:
                pytest.fail(
                    f"adaconvert serve exited with {cli.returncode}:\n{(work / 'cli.log').read_text()[-3000:]}"
                )
            if b"vLLM ready at" in (work / "cli.log").read_bytes():
                break
            time.sleep(1)
        else:
            pytest.fail(f"not ready after 600 s:\n{(work / 'cli.log').read_text()[-3000:]}")
        spawned = psutil.Process(cli.pid).children(recursive=True)
        yield url, cli, work, spawned
    finally:
        if cli.poll() is None:  # a test failed before the Ctrl-C test: stop it the same way, then for sure
            cli.send_signal(signal.SIGINT)
            try:
                cli.wait(timeout=60)
            except subprocess.TimeoutExpired:
                cli.kill()
        for child in spawned:
            if child.is_running():
                child.kill()
        out.close()


def _get(url: str):
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def _status(url: str, payload: dict, key: str | None) -> int:
    """The HTTP status of POSTing ``payload`` to ``url`` with ``key`` as bearer token (None: no header)."""
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.vllm
def test_server_reports_readiness_and_lists_every_model(server, tiny_llama):
    url, _, work, _ = server
    log = (work / "cli.log").read_text()
    assert "adapter raw (adalora): not in the safe layout, converting into" in log
    assert "KV cache for vLLM on CPU: " in log and " --kv-cache-memory-bytes " in log
    assert f"vLLM ready at {url}/v1" in log
    ids = {m["id"] for m in _get(f"{url}/v1/models")["data"]}
    assert ids == {str(tiny_llama.resolve()), "ada", "plain", "raw"}


@pytest.mark.vllm
def test_greedy_outputs_equal_peft(server, tiny_llama, adapters):
    from openai import OpenAI

    from tests.helpers.peft_utils import peft_greedy
    from tests.helpers.vllm_utils import prompt_token_ids

    url = server[0]
    client = OpenAI(base_url=f"{url}/v1", api_key=KEY, timeout=120, max_retries=0)
    prompts = prompt_token_ids(tiny_llama)
    cases = {name: original for name, (_, original) in adapters.items()} | {str(tiny_llama.resolve()): None}
    outputs = {}
    for model, original in cases.items():
        response = client.completions.create(
            model=model,
            prompt=prompts,
            max_tokens=8,
            temperature=0.0,
            extra_body={"return_token_ids": True, "ignore_eos": True},
        )
        served = [c.model_extra["token_ids"] for c in sorted(response.choices, key=lambda c: c.index)]
        expected = [tokens for tokens, _ in peft_greedy(tiny_llama, original, prompts)]
        assert served == expected, model
        outputs[model] = served
    assert len({json.dumps(v) for v in outputs.values()}) == len(outputs), "every adapter must change the output"


@pytest.mark.vllm
def test_api_key_is_required_and_runtime_loading_is_off(server, tiny_llama, adapters):
    psutil = require("psutil", purpose="the server tests")
    url, cli, work, spawned = server
    completion = {"model": "ada", "prompt": "hello", "max_tokens": 2, "temperature": 0.0}
    assert _status(f"{url}/v1/completions", completion, None) == 401
    assert _status(f"{url}/v1/completions", completion, "sk-wrong") == 401
    assert _status(f"{url}/v1/completions", completion, KEY) == 200
    # with runtime loading off vLLM has no such route: a client cannot make it load a path of this machine
    load = {"lora_name": "evil", "lora_path": str(adapters["plain"][0])}
    assert _status(f"{url}/v1/load_lora_adapter", load, KEY) == 404
    assert "evil" not in {m["id"] for m in _get(f"{url}/v1/models")["data"]}
    for process in [psutil.Process(cli.pid), *spawned]:
        if process.is_running() and process.status() != "zombie":
            assert KEY not in " ".join(process.cmdline()), process  # out of `ps`
    (vllm_server,) = [p for p in spawned if p.ppid() == cli.pid]
    vllm_env = vllm_server.environ()
    assert vllm_env.get("VLLM_API_KEY") == KEY and "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in vllm_env
    log = (work / "cli.log").read_text()
    assert "not passing VLLM_ALLOW_RUNTIME_LORA_UPDATING on to vLLM" in log
    assert KEY not in log + (work / "vllm.log").read_text()


@pytest.mark.vllm
def test_port_clash_with_the_running_server(server, tiny_llama, adapters, tmp_path, capsys):
    port = int(server[0].rsplit(":", 1)[1])
    argv = ["serve", str(tiny_llama), f"ada={adapters['ada'][0]}", "--port", str(port), "--cache-dir", str(tmp_path)]
    assert main([*argv, "-q"]) == 9
    assert "another server holds it" in capsys.readouterr().err


@pytest.mark.vllm
def test_ctrl_c_stops_the_server_cleanly(server):
    url, cli, work, spawned = server
    assert spawned, "vLLM's processes should be known"
    cli.send_signal(signal.SIGINT)
    assert cli.wait(timeout=90) == 0
    for child in spawned:
        assert not child.is_running() or child.status() == "zombie", child
    check_port_free("127.0.0.1", int(url.rsplit(":", 1)[1]))
    assert "vLLM stopped" in (work / "cli.log").read_text()


@pytest.mark.vllm
def test_vllm_that_cannot_start_gives_its_one_line_reason(tiny_llama, adapters, tmp_path):
    """A KV cache larger than the machine: vLLM refuses after loading the model; the user gets vLLM's reason in one
    line and exit status 9, the traceback stays in the log."""
    require("vllm", purpose="the vLLM tests")
    argv = [sys.executable, "-m", "adaconvert.cli", "serve", str(tiny_llama), f"ada={adapters['ada'][0]}", "-q"]
    argv += ["--port", str(_free_port()), "--cache-dir", str(tmp_path), "--kv-cache-gib", "100000"]
    run = subprocess.run(argv, capture_output=True, text=True, env=user_env(), timeout=600)
    assert run.returncode == 9, run.stderr[-3000:]
    assert run.stdout == "" and len(run.stderr.splitlines()) == 1, run.stderr[-3000:]
    assert run.stderr.startswith("error: vLLM exited with code 1 before it was ready: ValueError: Available memory on")
    assert "less than requested memory for kv (100000.0 GiB)" in run.stderr
    (log,) = (tmp_path / "logs").glob("vllm-*.log")
    assert f"(full log: {log})" in run.stderr and "Traceback (most recent call last)" in log.read_text()


def test_kv_cache_options(tiny_llama, adapters, tmp_path, monkeypatch):
    """--kv-cache-gib goes into the command as bytes; sized on CPU unless the user sized it (flags after `--`, the
    environment variable); bad values are refused before anything starts."""
    require("vllm", purpose="the KV cache sizing (it asks vLLM which platform it runs on)")
    ada = {"ada": adapters["ada"][0]}
    plan = plan_serve(tiny_llama, ada, cache_dir=tmp_path, kv_cache_gib=1.5)
    assert plan.command[plan.command.index("--kv-cache-memory-bytes") + 1] == str(3 << 29)
    assert engine_memory_args(plan) == []
    auto = plan_serve(tiny_llama, ada, cache_dir=tmp_path, extra_args=["--max-model-len", "128", "--dtype=float32"])
    assert "--kv-cache-memory-bytes" not in auto.command
    flag, size = engine_memory_args(auto)
    # 128 sequences (vLLM's server default) of 128 tokens × 2 layers × 1 KV head × 32 dims × K and V × 4 bytes
    assert (flag, int(size)) == ("--kv-cache-memory-bytes", 128 * 128 * 2 * 1 * 32 * 2 * 4)
    for extra in (["--gpu-memory-utilization", "0.5"], ["--kv-cache-memory-bytes=1000000"]):
        assert engine_memory_args(plan_serve(tiny_llama, ada, cache_dir=tmp_path, extra_args=extra)) == []
    with pytest.raises(InvalidConfigError, match="--kv-cache-gib must be positive"):
        plan_serve(tiny_llama, ada, cache_dir=tmp_path, kv_cache_gib=0)
    with pytest.raises(InvalidConfigError, match="clashes with the KV cache"):
        plan_serve(tiny_llama, ada, cache_dir=tmp_path, kv_cache_gib=1, extra_args=["--gpu-memory-utilization", "1"])
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "2")
    assert engine_memory_args(auto) == []  # vLLM uses the user's variable
    with pytest.raises(InvalidConfigError, match="unset VLLM_CPU_KVCACHE_SPACE"):
        plan_serve(tiny_llama, ada, cache_dir=tmp_path, kv_cache_gib=1)


# --- exposure: API key, non-loopback hosts, runtime adapter loading; the process left as it was -------------------

KEY = "sk-adaconvert-TEST-9f8e7d6c5b4a"


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.3.2.1", True), ("::1", True), ("localhost", True), ("0.0.0.0", False),
     ("::", False), ("", False), ("192.168.1.20", False), ("example.org", False)],
)  # fmt: skip
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_key_or_insecure_allows_a_public_host_and_the_key_never_shows(tiny_llama, adapters, tmp_path):
    ada = {"ada": adapters["ada"][0]}
    insecure = plan_serve(tiny_llama, ada, host="0.0.0.0", insecure=True, cache_dir=tmp_path)
    assert insecure.api_key is None and insecure.to_dict()["api_key_set"] is False
    plan = plan_serve(tiny_llama, ada, host="0.0.0.0", api_key=KEY, cache_dir=tmp_path)
    assert plan.url.startswith("http://127.0.0.1:") and plan.to_dict()["api_key_set"] is True
    for text in (json.dumps(plan.to_dict()), plan.shell_command(), repr(plan), " ".join(plan.command)):
        assert KEY not in text
    server = VllmServer(plan, env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true"})
    env = server.server_env()
    assert env["VLLM_API_KEY"] == KEY and "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in env
    assert server.auth_headers() == {"Authorization": f"Bearer {KEY}"}


def test_server_env_drops_an_inherited_key_and_runtime_loading(tiny_llama, adapters, tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_API_KEY", "some-other-key")
    monkeypatch.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "1")
    plan = plan_serve(tiny_llama, {"ada": adapters["ada"][0]}, cache_dir=tmp_path)
    env = VllmServer(plan).server_env()
    assert "VLLM_API_KEY" not in env and "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in env
    assert os.environ["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "1"  # ours is left alone


def test_cli_refuses_a_public_host_without_a_key_and_never_prints_it(
    tiny_llama, adapters, tmp_path, capsys, monkeypatch
):
    argv = ["serve", str(tiny_llama), f"ada={adapters['ada'][0]}", "--cache-dir", str(tmp_path), "--dry-run"]
    argv += ["--port", str(_free_port()), "--host", "0.0.0.0"]
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    assert main([*argv, "-q"]) == 2
    _, err = capsys.readouterr()
    assert err.startswith("error: --host 0.0.0.0 is reachable from other machines") and len(err.splitlines()) == 1
    assert main([*argv, "-q", "--insecure"]) == 0
    capsys.readouterr()
    monkeypatch.setenv("VLLM_API_KEY", KEY)  # the way that keeps it out of `ps`
    assert main([*argv, "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["api_key_set"] is True and KEY not in out + err
    assert main([*argv, "--port", "0", "--api-key", KEY]) == 2  # an error once the key is known
    out, err = capsys.readouterr()
    assert "--port must be in" in err and KEY not in out + err


def test_library_calls_leave_the_signal_handler_and_environment_as_they_were(tiny_llama, adapters, tmp_path):
    def mine(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        before = dict(os.environ)
        with socket.socket() as holder:  # serve() gets past its handler swap, then fails to bind
            holder.bind(("127.0.0.1", 0))
            holder.listen()
            port = holder.getsockname()[1]
            for options in ({}, {"host": "0.0.0.0", "api_key": KEY}):
                with pytest.raises(ServeError, match="cannot listen on"):
                    serve(tiny_llama, {"ada": adapters["ada"][0]}, port=port, cache_dir=tmp_path, **options)
                assert signal.getsignal(signal.SIGTERM) is mine
                assert dict(os.environ) == before
    finally:
        signal.signal(signal.SIGTERM, previous)
