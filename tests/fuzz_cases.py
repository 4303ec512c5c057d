"""Malformed inputs for every tool, and the properties a tool must keep on them (issue 15).

Used by tests/test_fuzz.py (a few dozen examples per tool in the normal test run) and benchmarks/fuzz_campaign.py
(thousands). Inputs start from valid files and are broken by hypothesis-drawn mutations: fields deleted or given
values of any JSON type, records duplicated or replaced, odd image names, then the bytes cut, made non-UTF-8 or
nested 100,000 deep. A tool run passes when its exit code is 0, 2 or 3 with no traceback; after 2 the output tree
is byte-identical; after 0 every file it wrote parses.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import strategies as st

from mire_factory.io import run_cli
from mire_factory.synthetic import make_records, write_dataset

DEEP = 100_000
ODD_NAMES = ["../outside.png", "/etc/passwd", "a\x00b.png", "", "missing.png", "images", ".", "x" * 300,
             "图片.png", "a/../../b.png"]
ODD_TEXT = ["", "\x00", "退货页面", "<image>", "<image><image>", "商品头图", "\ud800", "null", "{", "所属类别",
            "<用户与客服的对话 START>", "x" * 1000]

atoms = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
                  st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12), st.sampled_from(ODD_TEXT))
json_values = st.recursive(atoms, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)


def _dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, allow_nan=True)


def mutate_rows(draw, rows: list, keys: list[str]) -> object:
    """1-3 structural mutations of a list of JSON objects; the result may be any JSON value."""
    rows = json.loads(json.dumps(rows))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["set", "set", "delete", "duplicate", "replace", "drop", "name", "wrap", "swap"]))
        if not isinstance(rows, list) or not rows:
            rows = draw(json_values) if op == "wrap" else rows
            continue
        k = draw(st.integers(0, len(rows) - 1))
        row = rows[k]
        if op in ("set", "delete", "name") and not isinstance(row, dict):
            op = "replace"
        if op == "set":
            row[draw(st.sampled_from(keys + ["extra"]))] = draw(json_values)
        elif op == "delete" and row:
            row.pop(draw(st.sampled_from(sorted(row))))
        elif op == "duplicate":
            rows.append(json.loads(json.dumps(row)))
        elif op == "replace":
            rows[k] = draw(json_values)
        elif op == "drop":
            rows.pop(k)
        elif op == "name":
            for key in ("image", "images"):
                if isinstance(row.get(key), list) and row[key]:
                    row[key][draw(st.integers(0, len(row[key]) - 1))] = draw(st.sampled_from(ODD_NAMES))
                    break
            else:
                row[draw(st.sampled_from(keys))] = draw(st.sampled_from(ODD_TEXT + ODD_NAMES))
        elif op == "wrap":
            rows = draw(st.sampled_from([{"data": rows}, [rows], None, "rows"]))
        elif op == "swap" and len(rows) > 1:
            j = draw(st.integers(0, len(rows) - 1))
            rows[k], rows[j] = rows[j], rows[k]
    return rows


def corrupt_bytes(draw, data: bytes) -> bytes:
    """Often unchanged; else cut, made non-UTF-8, emptied, nested 100,000 deep, or given a BOM or NULs."""
    op = draw(st.sampled_from(["same", "same", "same", "cut", "gbk", "latin", "empty", "deep", "bom", "nul"]))
    if op == "cut" and data:
        return data[: draw(st.integers(0, len(data) - 1))]
    if op == "gbk":
        return data.decode("utf-8", "replace").encode("gbk", "replace") + "退货".encode("gbk")
    if op == "latin":
        pos = draw(st.integers(0, len(data)))
        return data[:pos] + b"\xff\xfe\x80" + data[pos:]
    if op == "empty":
        return b""
    if op == "deep":
        return b"[" * DEEP + b"]" * DEEP if draw(st.booleans()) else b'{"a":' * DEEP
    if op == "bom":
        return b"\xef\xbb\xbf" + data
    if op == "nul":
        return data.replace(b'"', b'"\x00', 1)
    return data


@st.composite
def mire_json(draw, rows: list[dict]) -> bytes:
    mutated = mutate_rows(draw, rows, ["id", "instruction", "input", "output", "image"])
    return corrupt_bytes(draw, _dumps(mutated).encode("utf-8", "surrogatepass"))


@st.composite
def sharegpt_json(draw, rows: list[dict]) -> bytes:
    mutated = mutate_rows(draw, rows, ["id", "messages", "images"])
    return corrupt_bytes(draw, _dumps(mutated).encode("utf-8", "surrogatepass"))


@st.composite
def dataset_info_json(draw, info: dict, name: str) -> bytes:
    info = json.loads(json.dumps(info))
    key = draw(st.sampled_from(["file_name", "formatting", "columns", "tags", None]))
    if key is None:
        info[name] = draw(json_values)
    else:
        info[name][key] = draw(json_values | st.sampled_from(["../../etc/passwd", "nope.json", "sharegpt", "images",
                                                              {"messages": "conversations"}, {"role_tag": 5}]))
    return corrupt_bytes(draw, _dumps(info).encode("utf-8", "surrogatepass"))


def _jsonl(rows) -> bytes:
    if not isinstance(rows, list):
        return (_dumps(rows) + "\n").encode("utf-8", "surrogatepass")
    return "".join(_dumps(r) + "\n" for r in rows).encode("utf-8", "surrogatepass")


@st.composite
def jsonl_file(draw, rows: list[dict], keys: list[str]) -> bytes:
    mutated = mutate_rows(draw, rows, keys)
    data = _jsonl(mutated)
    if draw(st.booleans()):  # a line-level fault: a broken, blank or non-object line somewhere
        lines = data.split(b"\n")
        pos = draw(st.integers(0, len(lines)))
        lines.insert(pos, draw(st.sampled_from([b"", b"{", b"[1, 2]", b'"x"', b'{"id": "a", "predict": ', b"null"])))
        data = b"\n".join(lines)
    return corrupt_bytes(draw, data)


@st.composite
def teacher_body(draw, valid: str) -> str:
    """A chat-completion body of any shape: the valid one mutated, any JSON value, or text that is not JSON."""
    kind = draw(st.sampled_from(["mutated", "mutated", "mutated", "any", "text"]))
    if kind == "any":
        return _dumps(draw(json_values))
    if kind == "text":
        return draw(st.sampled_from(["", "not json", valid[: len(valid) // 2], "[" * DEEP, '{"choices": [' * 5000]))
    body = json.loads(valid)
    for _ in range(draw(st.integers(1, 3))):
        target = draw(st.sampled_from(["body", "choices", "choice", "message", "usage"]))
        key = draw(st.sampled_from(["choices", "message", "content", "refusal", "finish_reason", "usage",
                                    "prompt_tokens", "index"]))
        value = draw(json_values | st.sampled_from(['{"理由": "r", "所属类别": "退货页面"}', "x", True]))
        try:
            holder = {"body": body, "choices": body.get("choices"), "choice": body["choices"][0],
                      "message": body["choices"][0]["message"], "usage": body.get("usage")}[target]
        except (AttributeError, KeyError, IndexError, TypeError):
            holder = body
        if isinstance(holder, dict):
            holder[key] = value
        elif isinstance(holder, list) and holder:
            holder[0] = value
    return _dumps(body)


# ---------------------------------------------------------------- running a tool and checking what it did


@dataclass
class Result:
    code: int | None
    stdout: str
    stderr: str
    problems: list[str] = field(default_factory=list)


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def parses(path: Path) -> str | None:
    """Why a written file does not parse, or None."""
    try:
        if path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
        elif path.suffix == ".jsonl":
            # blank lines are allowed, as the project's readers (io.numbered_jsonl) allow them: a log resumed from a
            # file that had one keeps it (found by a draw whose existing info file began with a blank line)
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    json.loads(line)
        elif path.suffix == ".csv":
            import pandas as pd

            pd.read_csv(path, encoding="utf-8-sig")
        elif path.suffix == ".png":
            from PIL import Image

            with Image.open(path) as img:
                img.verify()
        elif path.suffix == ".md":
            path.read_text(encoding="utf-8")
    except Exception as exc:  # noqa: BLE001 - any failure to read back is the finding
        return f"{path.name}: {type(exc).__name__}: {exc}"
    return None


def run_tool(main, args: list, out_root: Path, allowed: tuple[int, ...] = (0, 2, 3)) -> Result:
    """Runs a tool's main through run_cli in this process and checks the properties."""
    before = snapshot(out_root)
    out, err = io.StringIO(), io.StringIO()
    code: int | None = None
    crash = None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            run_cli(main, [str(a) for a in args])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
        except BaseException:  # noqa: BLE001 - what would have reached the user as a traceback
            crash = traceback.format_exc()
    result = Result(code, out.getvalue(), err.getvalue())
    if crash is not None:
        result.problems.append("traceback: " + crash)
    elif code not in allowed:
        result.problems.append(f"exit code {code}")
    if "Traceback" in result.stderr:
        result.problems.append("traceback on stderr: " + result.stderr[-2000:])
    after = snapshot(out_root)
    if code == 2 and after != before:
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        result.problems.append(f"outputs changed on refusal: {changed}")
    if code == 0:
        for name, data in after.items():
            if before.get(name) != data and not name.endswith(".lock"):
                why = parses(out_root / name)
                if why:
                    result.problems.append(f"written file does not parse: {why}")
    return result


# ---------------------------------------------------------------- valid material to break


@dataclass
class Material:
    root: Path
    images: Path
    train_rows: list[dict]
    test_rows: list[dict]
    train: Path
    converted: Path  # a tools.convert output folder (mire_train.json, dataset_info.json)
    prediction_rows: list[dict]
    reason_rows: list[dict]
    reasons: Path
    reply: str  # a valid chat completion body

    def fresh_output(self, name: str, template: Path | None = None) -> Path:
        """An output folder that already holds files of an earlier run (so a refusal has something to keep)."""
        out = self.root / f"run-{name}"  # beside `converted`: a copy keeps its relative image paths
        if out.exists():
            shutil.rmtree(out)
        if template is not None:
            shutil.copytree(template, out)
        else:
            out.mkdir(parents=True)
            (out / "earlier.json").write_text('{"earlier": true}\n', encoding="utf-8")
        return out


def make_material(root: Path) -> Material:
    from mire_factory.convert import convert
    from mire_factory.reasons import ReasonRecord

    images = root / "images"
    train_rows = make_records(3, 3, images, seed=11, max_dialogue_images=1, image_size=(28, 28))
    test_rows = [{k: v for k, v in r.items() if k != "output"} for r in train_rows]
    write_dataset(root / "train.json", train_rows)
    convert(root / "train.json", images, root / "converted", val_size=0)
    prediction_rows = [{"id": r["id"], "predict": r["output"]} for r in train_rows]
    reason_rows = [json.loads(ReasonRecord(id=r["id"], mode=2, model="t", status="ok", reason="界面显示了相关内容。",
                                           label=r["output"], gold=r["output"], task=None).to_json())
                   for r in train_rows]
    reasons = root / "reasons.jsonl"
    reasons.write_bytes(_jsonl(reason_rows))
    from mire_factory.image_info import InfoRecord, file_sha256

    info_rows = [json.loads(InfoRecord(p.name, file_sha256(p), "ocr", "m", "ok", text=f"第{k}行\n订单").to_json())
                 for k, p in enumerate(sorted(images.iterdir()))]
    (root / "info.jsonl").write_bytes(_jsonl(info_rows))
    reply = _dumps({"id": "c", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": '{"理由": "页面显示退货进度", "所属类别": "退货页面"}'},
         "finish_reason": "stop"}], "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}})
    return Material(root, images, train_rows, test_rows, root / "train.json", root / "converted", prediction_rows,
                    reason_rows, reasons, reply)


PREDICTION_KEYS = ["id", "predict", "label", "prompt", "task"]
REASON_KEYS = ["id", "mode", "model", "status", "reason", "label", "gold", "task", "raw", "usage", "latency_s", "error"]
INFO_KEYS = ["image", "sha256", "backend", "model", "status", "text", "lines", "info", "prompt_sha256", "width", "height",
             "raw", "usage", "latency_s", "error"]



# ---------------------------------------------------------------- one case per tool (or pair of tools)
# Each draws its inputs from `data` (hypothesis' st.data()), runs the tools and returns their Results.


def _tools():
    from tools import analyze, cal_acc, convert, convert2submit, distill, merge_cot, validate, vllm_infer, vote

    return analyze, cal_acc, convert, convert2submit, distill, merge_cot, validate, vllm_infer, vote


def _generate_args(m: Material, server, out: Path) -> list:
    prompt = m.root / "prompt.txt"
    prompt.write_text("描述这张图片", encoding="utf-8")
    return ["--image_dir", m.images, "--input_file", m.train, "--prompt_file", prompt, "--base_url", server.url,
            "--model", "t", "--output_file", out / "info.jsonl", "--limit", "3", "--max_retries", "0",
            "--concurrency", "1", "--no_progress"]


def _info_rows(m: Material) -> list[dict]:
    """A valid info file of tools.generate for the first image of the material (its origin: model t, the prompt)."""
    from mire_factory.generate import make_prompt
    from mire_factory.image_info import InfoRecord, file_sha256

    prompt = m.root / "prompt.txt"
    prompt.write_text("描述这张图片", encoding="utf-8")
    sha = make_prompt(str(prompt), None, extract_info=False).sha256
    name = next(r["image"][0] for r in m.train_rows if r["image"])
    return [json.loads(InfoRecord(name, file_sha256(m.images / name), "teacher", "t", "ok", text="一张图",
                                  prompt_sha256=sha, raw="一张图").to_json())]


def case_generate_info_file(m: Material, server, data) -> list[Result]:
    """An existing --output_file of any shape: resumed when it is an info file of the same origin, else refused."""
    from tools import generate

    out = m.fresh_output("generate_info")
    (out / "info.jsonl").write_bytes(data.draw(jsonl_file(_info_rows(m), INFO_KEYS)))
    extra = ["--export_dir", out / "export"] if data.draw(st.booleans()) else []
    return [run_tool(generate.main, [*_generate_args(m, server, out), *extra], out)]


def case_generate_replies(m: Material, server, data) -> list[Result]:
    """Any reply bodies: each image ends as one line, exit 0 or 3; tools.extract_info's teacher reads them too."""
    from tools import extract_info, generate

    results = []
    for tool, extra in ((generate, []), (extract_info, ["--backend", "teacher"])):
        server.queue([data.draw(teacher_body(m.reply)) for _ in range(3)])
        out = m.fresh_output("generate_replies")
        args = _generate_args(m, server, out)
        if tool is extract_info:
            args = [a for k, a in enumerate(args) if a != "--prompt_file" and (k == 0 or args[k - 1] != "--prompt_file")]
        result = run_tool(tool.main, [*args, *extra], out, allowed=(0, 3))
        path = out / "info.jsonl"
        lines = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()] if path.is_file() else []
        if len(lines) != 3 or len({x["image"] for x in lines}) != 3:
            result.problems.append(f"{len(lines)} info lines for 3 images")
        if any((x["error"] is None) != (x["status"] == "ok") for x in lines):
            result.problems.append("a line whose error does not match its status")
        if (result.code == 3) != any(x["status"] == "failed" for x in lines):
            result.problems.append(f"exit {result.code} with statuses {[x['status'] for x in lines]}")
        results.append(result)
    return results


def case_validate_convert(m: Material, server, data) -> list[Result]:
    _, _, convert, _, _, _, validate, _, _ = _tools()
    src = m.root / "in.json"
    src.write_bytes(data.draw(mire_json(m.train_rows)))
    out = m.fresh_output("validate")
    first = run_tool(validate.main, ["--input_file", src, "--image_dir", m.images, "--verify_images"], out)
    out = m.fresh_output("convert", m.converted)
    extra = data.draw(st.sampled_from([[], ["--val_size", "0"], ["--task", "image"], ["--format", "swift"],
                                       ["--kind", "test"], ["--val_size", "0.5", "--task", "dialogue"],
                                       ["--prompt_variant", "screenshot_text", "--info_file", m.root / "info.jsonl"]]))
    return [first, run_tool(convert.main, ["--input_file", src, "--image_dir", m.images, "--output_dir", out,
                                           *extra], out)]


def _predictions(m: Material, data, name: str, valid: bool = False) -> Path:
    path = m.root / name
    path.write_bytes(_jsonl(m.prediction_rows) if valid else data.draw(jsonl_file(m.prediction_rows, PREDICTION_KEYS)))
    return path


def case_convert_info_file(m: Material, server, data) -> list[Result]:
    """A screenshot-text convert whose info file is broken in any way."""
    convert = _tools()[2]
    valid = [json.loads(x) for x in (m.root / "info.jsonl").read_text(encoding="utf-8").splitlines()]
    info = m.root / "info_fuzz.jsonl"
    info.write_bytes(data.draw(jsonl_file(valid, INFO_KEYS)))
    out = m.fresh_output("convert_info", m.converted)
    budget = data.draw(st.sampled_from(["256", "12", "1", "0", "-3"]))
    return [run_tool(convert.main, ["--input_file", m.train, "--image_dir", m.images, "--output_dir", out,
                                    "--prompt_variant", data.draw(st.sampled_from(["screenshot_text",
                                                                                   "screenshot_text_cot"])),
                                    "--info_file", info, "--info_max_tokens", budget], out)]


def case_submit_cal_acc(m: Material, server, data) -> list[Result]:
    _, cal_acc, _, convert2submit, _, _, _, _, _ = _tools()
    preds = _predictions(m, data, "p.jsonl")
    test = m.root / "test.json"
    test.write_bytes(_dumps(m.test_rows).encode() if data.draw(st.booleans()) else data.draw(mire_json(m.test_rows)))
    out = m.fresh_output("submit")
    (out / "submit.csv").write_text("id,predict\nold,old\n", encoding="utf-8-sig")
    fill = ["--fill"] if data.draw(st.booleans()) else []
    first = run_tool(convert2submit.main, ["--test_file", test, "--prediction_file", preds, "--save_path",
                                           out / "submit.csv", *fill], out)
    out = m.fresh_output("cal_acc")
    plots = ["--plot_dir", out / "plots"] if data.draw(st.integers(0, 4)) == 0 else []  # plotting is slow
    return [first, run_tool(cal_acc.main, ["--test_file", m.train, "--prediction_file", preds, "--json_file",
                                           out / "metrics.json", *plots, *fill], out)]


def case_vote(m: Material, server, data) -> list[Result]:
    vote = _tools()[8]
    first = _predictions(m, data, "a.jsonl", valid=data.draw(st.integers(0, 4)) == 0)
    second = _predictions(m, data, "b.jsonl", valid=data.draw(st.booleans()))  # so that some votes succeed
    out = m.fresh_output("vote")
    extra = data.draw(st.sampled_from([[], ["--weights", "1,2"], ["--weights", "x"], ["--tie_break", "model:3"],
                                       ["--unanimous_out", out / "u.json"]]))
    return [run_tool(vote.main, ["--prediction_file", first, "--prediction_file", second, "--test_file", m.train,
                                 "--save_path", out / "vote.jsonl", *extra], out)]


def case_analyze_merge_cot(m: Material, server, data) -> list[Result]:
    analyze, _, _, _, _, merge_cot, _, _, _ = _tools()
    reasons = m.root / "r.jsonl"
    reasons.write_bytes(data.draw(jsonl_file(m.reason_rows, REASON_KEYS)))
    out = m.fresh_output("analyze")
    first = run_tool(analyze.main, ["--input_file", m.train, "--reasons_file", reasons, "--output_dir", out], out)
    out = m.fresh_output("merge", m.converted)
    dataset = out / "mire_train.json"
    if data.draw(st.booleans()):
        source = m.root / "sharegpt.json"
        source.write_bytes(data.draw(sharegpt_json(json.loads(dataset.read_text(encoding="utf-8")))))
        dataset = source
    return [first, run_tool(merge_cot.main, ["--dataset_file", dataset, "--reasons_file", reasons, "--output_file",
                                             out / "mire_train_cot.json", "--keep_unexplained"], out)]


def case_distill_input(m: Material, server, data) -> list[Result]:
    distill = _tools()[4]
    src = m.root / "distill_in.json"
    src.write_bytes(data.draw(mire_json(m.train_rows)))
    out = m.fresh_output("distill_in")
    return [run_tool(distill.main, ["--input_file", src, "--image_dir", m.images, "--base_url", server.url, "--model",
                                    "t", "--mode", data.draw(st.sampled_from(["1", "2"])), "--output_file",
                                    out / "r.jsonl", "--limit", "2", "--max_retries", "0", "--no_progress"], out)]


def case_teacher_replies(m: Material, server, data) -> list[Result]:
    """Any reply bodies, served verbatim by the loopback server: each request ends as one line, exit 0 or 3."""
    distill = _tools()[4]
    server.queue([data.draw(teacher_body(m.reply)) for _ in range(3)])
    out = m.fresh_output("distill_replies")
    result = run_tool(distill.main, ["--input_file", m.train, "--image_dir", m.images, "--base_url", server.url,
                                     "--model", "t", "--mode", "2", "--output_file", out / "r.jsonl", "--limit", "3",
                                     "--max_retries", "0", "--concurrency", "1", "--no_progress"], out, allowed=(0, 3))
    path = out / "r.jsonl"
    lines = [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()] if path.is_file() else []
    if len(lines) != 3 or len({x["id"] for x in lines}) != 3:
        result.problems.append(f"{len(lines)} reasons lines for 3 requests")
    if any((x["error"] is None) != (x["status"] == "ok") for x in lines):
        result.problems.append("a line whose error does not match its status")
    if (result.code == 3) != any(x["status"] == "failed" for x in lines):
        result.problems.append(f"exit {result.code} with statuses {[x['status'] for x in lines]}")
    return [result]


def case_infer_input(m: Material, server, data) -> list[Result]:
    vllm_infer = _tools()[7]
    out = m.fresh_output("infer", m.converted)
    target = data.draw(st.sampled_from(["dataset_info.json", "mire_train.json", "mire_train.json", None]))
    if target is not None:  # None: valid input, the shard is merged
        content = json.loads((out / target).read_text(encoding="utf-8"))
        strategy = dataset_info_json(content, "mire_train") if target == "dataset_info.json" else sharegpt_json(content)
        (out / target).write_bytes(data.draw(strategy))
    (out / "preds.shard-0-of-1.jsonl").write_bytes(_jsonl(m.prediction_rows))
    return [run_tool(vllm_infer.main, ["--dataset", "mire_train", "--dataset_dir", out, "--save_name",
                                       out / "preds.jsonl", "--merge_shards", "--num_shards", "1"], out)]


CASES = {
    "validate+convert": case_validate_convert,
    "convert (screenshot text info file)": case_convert_info_file,
    "convert2submit+cal_acc": case_submit_cal_acc,
    "vote": case_vote,
    "analyze+merge_cot": case_analyze_merge_cot,
    "distill (input)": case_distill_input,
    "distill (teacher replies)": case_teacher_replies,
    "vllm_infer (input loading)": case_infer_input,
    "generate (its info file)": case_generate_info_file,
    "generate, extract_info (teacher replies)": case_generate_replies,
}
