"""bin/pfrest-bench runs end to end in a tiny configuration and prints its figures.  No timing is
asserted: the figures depend on the machine."""

import json
import os
import re
import subprocess
import sys

from conftest import ROOT, need_binary, pfrest_env


def test_bench_prints_figures():
    need_binary("socat")
    out = subprocess.run([sys.executable, f"{ROOT}/bin/pfrest-bench", "--backend", "python", "--clients", "2",
                          "--client-processes", "1", "--duration", "0.3", "--runs", "1", "--modes", "tcp",
                          "--paced-lookups", "200", "--cache-warmup", "0.2", "--spawn-runs", "1",
                          "--workers", "2", "--idle", "20"],
                         capture_output=True, text=True, timeout=120, env=pfrest_env(), cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    number = r"\s+\d+(\.\d+)?"
    for label in ("serve tcp uniform", "serve tcp skewed cache", "serve tcp uniform @200/s",
                  "serve tcp uniform +20 idle"):
        assert re.search(re.escape(label) + number * 6, text), text  # rate, p50, p90, p99, max, CPU
    assert re.search(r"direct HTTP lookup uniform" + number * 5, text), text
    # fewer backend requests in the window and from the start, no bad reply
    assert re.search(r"serve tcp skewed cache .* -?\d+\.\d% +-?\d+\.\d% +0\n", text), text
    assert "--workers 2" in text
    assert re.search(r"pfrest handle under socat, connect.first reply:\s+\d+\.\d ms", text), text
    assert re.search(r"a handle's private memory \(RssAnon\) after its first reply, .*python.*: \d+\.\d\d MiB "
                     r"\(least of 5; reply 200\)", text), text


def test_bench_fleet_mode_prints_figures():
    need_binary("redis-server")
    out = subprocess.run([sys.executable, f"{ROOT}/bin/pfrest-bench", "--fleet", "2", "--backend", "python",
                          "--clients", "4", "--client-processes", "1", "--duration", "0.3", "--runs", "1",
                          "--cache-warmup", "0.2", "--refresh-keys", "4"],
                         capture_output=True, text=True, timeout=240, env=pfrest_env(), cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout.split("medians of 1 run(s)")[1]
    number = r"\s+(-|\d+(\.\d+)?)"
    for label in ("2 hosts, separate caches", "2 hosts, shared cache", "500 keys, local hits",
                  "500 keys, store hits (local-ttl 0)"):
        # rate, p50, p99, CPU, store CPU, lookups, distinct, backend, /1000, /key; no bad reply, no skip
        assert re.search(re.escape(label) + number * 10 + r"\s+0\s+0\n", text), text
    assert re.search(r"backend requests per distinct key of the fleet: separate caches \d+\.\d\d, shared cache "
                     r"\d+\.\d\d", text), text
    assert re.search(r"CPU of a lookup answered from the store: \d+\.\d us, from the local cache \d+\.\d us", text)
    # the failover under Sentinel and refresh ahead: figures, and never a wrong or unanswered lookup
    assert re.search(r"failover \(2 hosts, .*: the replica promoted \d+\.\d s after the primary's SIGKILL, the hosts "
                     r"sharing again after \d+\.\d s; .* wrong 0, unanswered 0 \(of \d+\)", text), text
    for label in ("no refresh ahead", "stale-while-revalidate 60 s"):
        # --refresh-keys 4: the warm-up fetches 4 keys one by one (200 ms each), not the default 20
        assert re.search(rf"refresh ahead, {label}: 2 hosts, backend 200 ms, 4 hot keys, .* \d+ waited for the "
                         r"backend; backend requests per key per lifetime for the fleet \d+\.\d\d; wrong 0, "
                         r"unanswered 0", text), text
    assert "Traceback" not in out.stderr, out.stderr


def test_bench_measures_logins():
    """--modes auth: dovecot-sasl logins (AUTH PLAIN with an initial response over smtpd-like persistent
    connections), paced too, and the same logins straight to the backend for the ratio; none fails."""
    out = subprocess.run([sys.executable, f"{ROOT}/bin/pfrest-bench", "--backend", "python", "--clients", "2",
                          "--client-processes", "1", "--duration", "0.3", "--runs", "1", "--modes", "auth",
                          "--workloads", "uniform", "--paced-policy", "100", "--spawn-runs", "0", "--workers", "1"],
                         capture_output=True, text=True, timeout=120, env=pfrest_env(), cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout.split("medians of 1 run(s)")[1]
    number = r"\s+\d+(\.\d+)?"
    for label in ("serve auth uniform", "serve auth uniform @100/s"):
        # rate, p50, p90, p99, max, CPU; ... no bad reply (every login answered OK)
        assert re.search(re.escape(label) + number * 6 + r".* 0\n", text), text
    assert re.search(r"direct HTTP auth" + number * 5, text), text
    assert re.search(r"auth +through pfrest: +\d+/s, .* straight to the backend: +\d+/s", text), text
    assert "serve auth skewed" not in text   # logins are never cached


SHORT = ["--backend", "python", "--clients", "2", "--client-processes", "1", "--duration", "0.3", "--runs", "1",
         "--modes", "tcp", "--workloads", "uniform", "--paced-lookups", "0", "--spawn-runs", "0"]


def test_bench_floor_pipelining_and_workers_rows():
    """--floor (1 and 2 processes), --pipelining and two --workers values: their rows in the one table, each
    with a positive rate and CPU and no bad reply, and pfrest's ratios to the floor with as many processes."""
    out = subprocess.run([sys.executable, f"{ROOT}/bin/pfrest-bench", *SHORT, "--workers", "2,1", "--pipelining",
                          "--floor"], capture_output=True, text=True, timeout=120, env=pfrest_env(), cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout.split("medians of 1 run(s)")[1]
    for label in ("serve tcp uniform", "serve tcp uniform pipelined", "serve tcp uniform w1",
                  "serve tcp uniform w1 pipelined", "floor tcp uniform", "floor tcp uniform x2"):
        row = re.search(r"\n" + re.escape(label) + r" +(\d+) +(\d+\.\d+)(?: +\d+\.\d+){3} +(\d+\.\d+) .* 0\n",
                        text)
        assert row and int(row[1]) > 0 and float(row[3]) > 0, (label, text)
    ratios = text.split("the floor (same clients, same keys, closed loop):")[1]
    assert re.search(r"floor tcp uniform +\d+/s, p50 +\d+\.\d+ ms: \d+\.\d% of the backend's rate alone\n"
                     r" +serve tcp uniform w1 +\d+\.\d\dx its lookups/s .*\n"
                     r" +serve tcp uniform w1 pipelined +\d+\.\d\dx its lookups/s .*\n"
                     r" +floor tcp uniform x2 .*\n +serve tcp uniform +\d+\.\d\dx its", ratios), ratios
    assert "Traceback" not in out.stderr, out.stderr


def test_bench_compare_with_gives_the_original_config_and_stops_the_connector(tmp_path):
    """--compare-with: a program that is not executable is refused; one that is gets a config of the
    original program's keys for the endpoint and port measured, and is stopped when the bench ends, here
    because it never listens (a real process: a shell that records its config and pid, then sleeps)."""
    bench = [sys.executable, f"{ROOT}/bin/pfrest-bench", *SHORT, "--workers", "1", "--no-direct"]
    out = subprocess.run(bench + ["--compare-with", str(tmp_path)], capture_output=True, text=True, timeout=60,
                         env=pfrest_env(), cwd=ROOT)
    assert out.returncode == 2 and "--compare-with " + str(tmp_path) + ": not an executable file" in out.stderr
    connector = tmp_path / "connector"
    connector.write_text(f'#!/bin/sh\ncp "$1" {tmp_path}/config.json\necho $$ > {tmp_path}/pid\nexec sleep 60\n')
    connector.chmod(0o755)
    out = subprocess.run(bench + ["--compare-with", str(connector)], capture_output=True, text=True, timeout=60,
                         env=pfrest_env(), cwd=ROOT)
    assert out.returncode == 1, out.stdout + out.stderr
    failed = re.search(r"pfrest-bench: \S+/connector: nothing listens on 127\.0\.0\.1:(\d+) after 3\.0 s", out.stderr)
    assert failed, out.stderr
    assert re.search(r"\nserve tcp uniform +[1-9]", out.stdout), out.stdout   # pfrest was measured before it
    config = json.loads((tmp_path / "config.json").read_text())
    endpoint, = config["endpoints"]
    assert set(endpoint) == {"name", "mode", "target", "bind-address", "bind-port", "auth-token", "request-timeout"}
    assert (endpoint["mode"], endpoint["bind-port"]) == ("tcp-lookup", int(failed[1]))
    assert endpoint["target"].startswith("http://127.0.0.1:") and endpoint["target"].endswith("/lookup")
    pid = int((tmp_path / "pid").read_text())
    assert not os.path.exists(f"/proc/{pid}"), "the compared connector was left running"


def test_bench_steps_prints_a_figure_per_step():
    """--steps: the per-step CPU table, a figure for every step of each kind of request (none asserted)."""
    out = subprocess.run([sys.executable, f"{ROOT}/bin/pfrest-bench", "--steps", "--steps-iterations", "50",
                          "--steps-rounds", "1"],
                         capture_output=True, text=True, timeout=120, env=pfrest_env(), cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert re.search(r"step +tcp +socketmap +policy\n", text), text
    number = r" +-?\d+"
    for step in ("decode", "request id", "backend request", "backend answer", "verdict", "answer (verdict+reply)",
                 "stats.record", "log line", "sum of the steps", "conversation, in memory", "its own overhead",
                 "backend client, in memory", "client's own overhead"):
        assert re.search(r"\n" + re.escape(step) + number * 3 + r"\n", text), text
    for row in ("asyncio task per request", "future + callback"):
        assert re.search(re.escape(row) + number + r"\n", text), text
