"""What pfrest-bench measures beside pfrest for --compare-with and --floor, and pfrest's ratios to them.

--compare-with PATH: another connector that takes the original program's JSON config (``PATH CONFIG``),
as the Rust connector (dutty5/postfix-rest-api-connector) does.  It is given the bench's own endpoint,
port and backend, with only the keys the original program knows, one endpoint per start (it is started
cold for every run, as pfrest is), and measured by the same clients.  --floor: bin/benchfloor.py, the
least a Python tcp_table proxy can do, in 1 and in 2 processes.  Imported by pfrest-bench, which starts
and stops these programs as it does ``pfrest serve``.
"""

import json
import os
import sys

# The keys of an endpoint in the original program's config; a connector that takes it may know no other
ORIGINAL_KEYS = ("name", "mode", "target", "bind-address", "bind-port", "auth-token", "request-timeout")
COMPARED_MODES = ("tcp", "socketmap")   # the policy protocol: the Rust connector closes after each reply
FLOOR_PROCESSES = (1, 2)
CONNECTOR_READY = 3.0   # seconds for a compared connector to listen (a compiled one takes milliseconds)
DIRECT_LABEL = "direct HTTP lookup uniform"   # pfrest-bench's backend-only row of lookups
LABEL_WIDTH = 34
FLOOR = os.path.join(os.path.dirname(os.path.realpath(__file__)), "benchfloor.py")


def compared_label(mode):
    return f"compared {mode} uniform"


def floor_label(processes):
    return "floor tcp uniform" + (f" x{processes}" if processes > 1 else "")


def serve_label(mode, workers, first, pipelined=False):
    """The closed-loop uniform row of ``serve``; a second --workers value gets its own rows, and so does
    --pipelining."""
    return f"serve {mode} uniform" + ("" if first else f" w{workers}") + (" pipelined" if pipelined else "")


def connector_config(bench_config, name, workdir):
    """A config for the compared connector holding the bench config's endpoint ``name`` alone."""
    with open(bench_config) as f:
        doc = json.load(f)
    endpoint = next(ep for ep in doc["endpoints"] if ep["name"] == name)
    path = os.path.join(workdir, f"compared-{name}.json")
    with open(path, "w") as f:
        json.dump({"user-agent": doc["user-agent"],
                   "endpoints": [{key: endpoint[key] for key in ORIGINAL_KEYS}]}, f, indent=1)
    os.chmod(path, 0o600)
    return path


def connector_env():
    """The compared connector's environment: its own default logging (RUST_LOG unset), as it is installed."""
    return {k: v for k, v in os.environ.items() if k != "RUST_LOG"}


def floor_command(port, backend_port, workdir, processes):
    return [sys.executable, FLOOR, str(port), str(backend_port), os.path.join(workdir, "floor.log"),
            str(processes)]


def print_ratios(figures, compared, out=sys.stdout):
    """pfrest's closed-loop uniform rows against the compared connector's (all of them, per mode) and the
    floor's (the rows with as many workers as the floor has processes), and each of these against the
    backend alone: lookups/s ratio and CPU-per-lookup ratio."""
    references = [f for f in figures if f.tags.get("kind") in ("compared", "floor") and f.median("rate")]
    direct = next((f for f in figures if f.label == DIRECT_LABEL and f.median("rate")), None)
    lines = []
    for ref in references:
        if direct:
            lines.append(f"  {ref.label:<{LABEL_WIDTH}} {ref.median('rate'):7.0f}/s, p50 {ref.median('p50'):6.2f} ms: "
                         f"{ref.median('rate') / direct.median('rate'):.1%} of the backend's rate alone")
        for f in figures:
            tags = f.tags
            if tags.get("kind") != "serve" or tags["mode"] != ref.tags["mode"] or not f.median("rate") or \
                    (ref.tags["kind"] == "floor" and tags["workers"] != ref.tags["workers"]):
                continue
            cpu, ref_cpu = f.median("cpu_per_1000"), ref.median("cpu_per_1000")
            lines.append(f"    {f.label:<{LABEL_WIDTH - 2}} {f.median('rate') / ref.median('rate'):5.2f}x its "
                         f"lookups/s ({f.median('rate'):7.0f}/s), CPU per lookup "
                         + (f"{cpu / ref_cpu:5.2f}x its ({cpu * 1000:6.1f} us, it {ref_cpu * 1000:6.1f} us)"
                            if cpu and ref_cpu else "-"))
    if lines:
        print("\npfrest against " + (f"the compared connector ({compared}) and " if compared else "")
              + "the floor (same clients, same keys, closed loop):", file=out)
        print("\n".join(lines), file=out)
        out.flush()
