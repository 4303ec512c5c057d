"""The robustness campaign of issue 15: thousands of malformed inputs against every tool, then distillation under
injected faults with a SIGKILL in the middle, on loopback only.

nice -n 10 python benchmarks/fuzz_campaign.py [--examples 300] [--requests 1000] [--fault_rate 0.35] [--seed 0]

Part 1 runs each case of tests/fuzz_cases.py (validate+convert, convert2submit+cal_acc, vote, analyze+merge_cot,
distill's input, distill's teacher replies through the loopback server, vllm_infer's input loading) for --examples
hypothesis examples, in-process. It counts inputs tried, exit codes, tracebacks, outputs changed on a refusal (exit
2) and written files that do not parse (exit 0).

Part 2 runs `python -m tools.distill` on --requests text-only records against tests/fault_server.py with
--fault_rate of its requests faulted (429 with Retry-After, 500, hangs past the timeout, TCP resets, cut bodies,
and odd shapes: choices ["x"], non-string content, usage "abc", refusal true, a list body), --permanent refusals,
unparseable replies and 400s, and --echo_key (the server copies the Authorization value into 理由 and labels). It
SIGKILLs the run when about half the lines are written, reruns the same command, and counts reasons lines,
duplicate keys and occurrences of the key in every file and stream.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from fault_server import FAULTS, ODD_FAULTS, RunningServer  # noqa: E402
from fuzz_cases import CASES, make_material  # noqa: E402

SECRET = "sk-MIRE-CAMPAIGN-3b9e1f2a7c4d6e8f0a1b"


def make_run(name, case, counts: Counter, material, server, examples: int, seed: int, seen: list[str]):
    """A hypothesis-driven run of one case that counts what happened instead of failing on it."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hseed
    from hypothesis import strategies as st

    @hseed(seed)
    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def run(data):
        results = case(material, server, data)
        counts["inputs"] += 1  # drawn in full and run (hypothesis also starts draws it then rejects)
        for result in results:
            counts["runs"] += 1
            counts[f"exit {result.code}"] += 1
            for p in result.problems:
                kind = ("tracebacks" if p.startswith("traceback") else "changed_on_refusal"
                        if p.startswith("outputs changed") else "unparseable_outputs"
                        if p.startswith("written file") else "other_problems")
                counts[kind] += 1
                if len(seen) < 10:  # a traceback is shown by its last line, the exception
                    seen.append(f"{name}: " + (p.strip().splitlines()[-1] if p.startswith("traceback") else p)[:300])

    return run


def fuzz(examples: int, seed: int, root: Path) -> dict:
    import functools

    import mire_factory.cot

    mire_factory.cot.qwen2_token_counter = functools.lru_cache(maxsize=1)(mire_factory.cot.qwen2_token_counter)
    material = make_material(root / "material")
    totals = {"inputs": 0, "runs": 0, "tracebacks": 0, "changed_on_refusal": 0, "unparseable_outputs": 0,
              "other_problems": 0, "codes": Counter(), "per_case": {}}
    examples_seen: list[str] = []
    with RunningServer() as server:
        for name, case in CASES.items():
            start = time.perf_counter()
            counts = Counter()
            make_run(name, case, counts, material, server, examples, seed, examples_seen)()
            elapsed = time.perf_counter() - start
            totals["per_case"][name] = {**counts, "seconds": round(elapsed, 1)}
            for key in ("inputs", "runs", "tracebacks", "changed_on_refusal", "unparseable_outputs", "other_problems"):
                totals[key] += counts[key]
            for key, n in counts.items():
                if key.startswith("exit "):
                    totals["codes"][key] += n
            print(f"  {name}: {counts['inputs']} inputs, {counts['runs']} tool runs, "
                  f"{dict(sorted((k, v) for k, v in counts.items() if k.startswith('exit ')))}, {elapsed:.1f}s",
                  flush=True)
    totals["examples"] = examples_seen
    return totals


def distill_under_faults(requests: int, fault_rate: float, seed: int, root: Path) -> dict:
    from mire_factory.synthetic import make_records, write_dataset

    train, images, out = root / "train.json", root / "images", root / "reasons.jsonl"
    write_dataset(train, make_records(0, requests, images, seed=seed, max_dialogue_images=0))
    faults = ",".join(FAULTS + ODD_FAULTS)
    server_args = ["--fault_rate", fault_rate, "--faults", faults, "--permanent", "--echo_key", "--hang", "2",
                   "--seed", seed, "--latency", "0.01"]
    cmd = [sys.executable, "-m", "tools.distill", "--input_file", str(train), "--image_dir", str(images), "--model",
           "teacher", "--mode", "1", "--output_file", str(out), "--concurrency", "32", "--max_retries", "8",
           "--timeout", "1", "--no_progress"]
    env = {**os.environ, "OPENAI_API_KEY": SECRET}
    streams = []
    with RunningServer(*server_args, env={"FAULT_SERVER_API_KEY": SECRET}) as server:
        run = [*cmd, "--base_url", server.url]
        start = time.perf_counter()
        child = subprocess.Popen(run, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.time() + 600
        while time.time() < deadline and child.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") >= requests // 2:
                break
            time.sleep(0.01)
        killed_alive = child.poll() is None
        if killed_alive:
            os.kill(child.pid, signal.SIGKILL)
        stdout, stderr = child.communicate()
        streams += [stdout.decode("utf-8", "replace"), stderr.decode("utf-8", "replace")]
        lines_at_kill = out.read_bytes().count(b"\n")
        rerun = subprocess.run(run, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        streams += [rerun.stdout, rerun.stderr]
        elapsed = time.perf_counter() - start
        stats = server.stats()
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    keys = Counter((r["id"], r["mode"], r["model"]) for r in rows)
    texts = streams + [p.read_text(encoding="utf-8", errors="replace") for p in root.rglob("*") if p.is_file()
                       and p.suffix in (".jsonl", ".json", ".lock", "")]
    chat = stats["requests"] - 1
    injected = sum(v for k, v in stats.items() if k.startswith("fault_"))
    return {
        "requests": requests, "reasons_lines": len(rows), "distinct_keys": len(keys),
        "duplicates": sum(n - 1 for n in keys.values()), "statuses": dict(Counter(r["status"] for r in rows)),
        "killed_mid_run": killed_alive, "lines_at_kill": lines_at_kill, "rerun_exit": rerun.returncode,
        "rerun_tail": rerun.stdout.strip().splitlines()[:2] + rerun.stderr.strip().splitlines()[:1],
        "chat_requests": chat, "faults_injected": injected, "fault_share": round(injected / max(chat, 1), 3),
        "faults": {k[6:]: v for k, v in sorted(stats.items()) if k.startswith("fault_")},
        "key_occurrences": sum(t.count(SECRET) for t in texts),
        "tracebacks": sum("Traceback" in s for s in streams), "seconds": round(elapsed, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=300, help="hypothesis examples per case (7 cases)")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--fault_rate", type=float, default=0.35)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip_fuzz", action="store_true")
    parser.add_argument("--skip_distill", action="store_true")
    args = parser.parse_args()
    print(f"{platform.node()}: {os.cpu_count()} CPUs, Python {platform.python_version()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        ok = True
        if not args.skip_fuzz:
            print(f"part 1: fuzzing, {args.examples} examples per case", flush=True)
            f = fuzz(args.examples, args.seed, Path(tmp))
            print(f"inputs tried: {f['inputs']} ({f['runs']} tool runs; exit codes {dict(sorted(f['codes'].items()))})")
            print(f"tracebacks: {f['tracebacks']}")
            print(f"outputs changed on refusal: {f['changed_on_refusal']}")
            print(f"written files that do not parse: {f['unparseable_outputs']}; other problems: "
                  f"{f['other_problems']}")
            for line in f["examples"]:
                print("  e.g. " + line)
            ok &= not (f["tracebacks"] or f["changed_on_refusal"] or f["unparseable_outputs"] or f["other_problems"])
        if not args.skip_distill:
            print(f"part 2: distill, {args.requests} requests, fault rate {args.fault_rate}, SIGKILL and rerun",
                  flush=True)
            d = distill_under_faults(args.requests, args.fault_rate, args.seed, Path(tmp) / "distill")
            print(f"reasons lines: {d['reasons_lines']} (requests: {d['requests']}; distinct keys "
                  f"{d['distinct_keys']}; statuses {d['statuses']})")
            print(f"duplicates: {d['duplicates']}")
            print(f"key occurrences in any file or stream: {d['key_occurrences']}")
            print(f"tracebacks: {d['tracebacks']}")
            print(f"killed mid-run: {d['killed_mid_run']} at {d['lines_at_kill']} lines; rerun exit {d['rerun_exit']}: "
                  f"{d['rerun_tail']}")
            print(f"faults injected: {d['faults_injected']} of {d['chat_requests']} chat requests "
                  f"({d['fault_share']:.1%}): {d['faults']}; {d['seconds']}s")
            ok &= (d["reasons_lines"] == d["requests"] == d["distinct_keys"] and not d["duplicates"]
                   and not d["key_occurrences"] and not d["tracebacks"] and d["killed_mid_run"])
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
